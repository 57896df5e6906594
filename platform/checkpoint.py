"""Sharded checkpoints with torch DCP, committed atomically, the last `keep_last` kept.

A checkpoint is a folder `step_<step>` that every rank writes its shards into; it
exists only once rank 0 has written the commit marker, after every rank finished.
A crash at any moment therefore leaves the previous committed checkpoint as the
latest. Model and optimizer state are saved under the model's parameter names
(`get_state_dict`), which is what lets a checkpoint load into another layout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

COMMIT_MARKER = "COMMITTED"
META_FILE = "meta.json"
PREFIX = "step_"


def step_of(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(PREFIX)
    return int(suffix) if folder.name.startswith(PREFIX) and suffix.isdigit() else None


class CheckpointStore:
    """The checkpoints of one run, in one folder."""

    def __init__(self, directory: str | Path, keep_last: int):
        self.directory = Path(directory)
        self.keep_last = keep_last

    def folder(self, step: int) -> Path:
        return self.directory / f"{PREFIX}{step:08d}"

    def committed_steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(
            step for folder in self.directory.iterdir()
            if (step := step_of(folder)) is not None and (folder / COMMIT_MARKER).is_file()
        )

    def latest(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def meta(self, step: int) -> dict:
        return json.loads((self.folder(step) / META_FILE).read_text())

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler, meta: dict) -> None:
        """Collective: every rank writes its shards, then rank 0 commits and prunes."""
        folder = self.folder(step)
        if rank() == 0 and folder.exists():  # the leftover of a save that crashed
            shutil.rmtree(folder)
        barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "scheduler": scheduler.state_dict()}
        dcp.save(state, checkpoint_id=str(folder))
        torch.save(rng_state(), folder / f"rng_rank{rank()}.pt")
        barrier()
        if rank() == 0:
            write_atomically(folder / META_FILE, json.dumps({"step": step, **meta}, indent=2))
            write_atomically(folder / COMMIT_MARKER, "")
            self.prune(keep=step)
        barrier()

    def load(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler) -> dict:
        """Collective: restore model, optimizer, scheduler and this rank's RNG; returns meta."""
        folder = self.folder(step)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "scheduler": scheduler.state_dict()}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        scheduler.load_state_dict(state["scheduler"])
        rng_file = folder / f"rng_rank{rank()}.pt"
        if rng_file.is_file():  # a rank that did not exist in the saving layout keeps its seed
            set_rng_state(torch.load(rng_file, weights_only=False))
        return self.meta(step)

    def prune(self, keep: int) -> None:
        """Delete committed checkpoints beyond `keep_last` and leftovers of failed saves."""
        committed = self.committed_steps()
        survivors = set(committed[-self.keep_last :]) | {keep}
        for folder in self.directory.iterdir():
            step = step_of(folder)
            if step is None or step in survivors:
                continue
            (folder / COMMIT_MARKER).unlink(missing_ok=True)  # uncommit first, then delete
            shutil.rmtree(folder, ignore_errors=True)


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
