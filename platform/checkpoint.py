"""Sharded checkpoints with torch DCP, committed atomically, the last `keep_last` kept.

A checkpoint is a folder `step_<step>` that every rank writes its shards into; it
exists only once rank 0 has written the commit marker, after every rank finished.
A crash at any moment therefore leaves the previous committed checkpoint as the
latest. Model and optimizer state are saved under the model's parameter names (the
optimizer state flattened to `state.<param>.<key>`), as DTensors where they are
sharded; DCP reshards on load, which is what lets a checkpoint load into any layout.
A rank holding several pipeline stages saves and loads them together.
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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

COMMIT_MARKER = "COMMITTED"
META_FILE = "meta.json"
PREFIX = "step_"
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # keyed by parameter name


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

    def save(self, step: int, parts: list[torch.nn.Module],
             optimizers: list[torch.optim.Optimizer], scheduler, meta: dict) -> None:
        """Collective: every rank writes its shards, then rank 0 commits and prunes."""
        folder = self.folder(step)
        if rank() == 0 and folder.exists():  # the leftover of a save that crashed
            shutil.rmtree(folder)
        barrier()
        state, _ = training_state(parts, optimizers, scheduler)
        dcp.save(state, checkpoint_id=str(folder))
        torch.save(rng_state(), folder / f"rng_rank{rank()}.pt")
        barrier()
        if rank() == 0:
            write_atomically(folder / META_FILE, json.dumps({"step": step, **meta}, indent=2))
            write_atomically(folder / COMMIT_MARKER, "")
            self.prune(keep=step)
        barrier()

    def load(self, step: int, parts: list[torch.nn.Module],
             optimizers: list[torch.optim.Optimizer], schedulers: list) -> dict:
        """Collective: restore model, optimizer, schedulers and this rank's RNG; returns meta."""
        folder = self.folder(step)
        state, keys = training_state(parts, optimizers, schedulers[0])
        dcp.load(state, checkpoint_id=str(folder))
        for part, optimizer, (model_keys, optim_keys) in zip(parts, optimizers, keys,
                                                            strict=True):
            set_model_state_dict(part, {k: state["model"][k] for k in model_keys})
            set_optimizer_state_dict(part, optimizer,
                                     {k: state["optim"][k] for k in optim_keys}, options=FLAT)
        for scheduler in schedulers:
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


def training_state(parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
                   scheduler) -> tuple[dict, list[tuple[list[str], list[str]]]]:
    """The state dict DCP saves and loads, and which of its keys belong to which part."""
    model_state: dict = {}
    optim_state: dict = {}
    keys = []
    for part, optimizer in zip(parts, optimizers, strict=True):
        part_model = get_model_state_dict(part)
        part_optim = get_optimizer_state_dict(part, optimizer, options=FLAT)
        model_state.update(part_model)
        optim_state.update(part_optim)
        keys.append((list(part_model), list(part_optim)))
    state = {"model": model_state, "optim": optim_state, "scheduler": scheduler.state_dict()}
    return state, keys


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
