"""Where a run's data ran out, kept beside its checkpoints by the driver when the
workers end the run for it, so that the same command says so again at once, before it
starts Ray: resuming from that checkpoint could only run out again (a resume keeps the
sources, their file lists and the sequence length), unless the global batch shrank."""

from __future__ import annotations

import json
from pathlib import Path

DATA_END_FILE = "data_end.json"
MAX_BYTES = 1024  # the file is data: read this much at most


def record_data_end(run_dir: Path, step: int, global_batch: int) -> None:
    (run_dir / DATA_END_FILE).write_text(json.dumps({"step": step,
                                                     "global_batch": global_batch}))


def data_ended_at(run_dir: Path, global_batch: int) -> int | None:
    """The step after which the data ran out with `global_batch`, as recorded; None when
    nothing (readable) is recorded, or it was at another global batch."""
    try:
        with open(run_dir / DATA_END_FILE, "rb") as file:
            recorded = json.loads(file.read(MAX_BYTES))
        step, batch = recorded["step"], recorded["global_batch"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if type(step) is not int or type(batch) is not int or batch != global_batch:
        return None
    return step
