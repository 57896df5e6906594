"""Sharded checkpoints with torch DCP, committed atomically, the last `keep_last` kept.

A checkpoint is a folder `step_<step>` that every rank writes its shards into; it
exists only once rank 0 has written the commit marker, after every rank finished.
A crash at any moment therefore leaves the previous committed checkpoint as the
latest. Model and optimizer state are saved under the model's parameter names (the
optimizer state flattened to `state.<param>.<key>`), as DTensors where they are
sharded; DCP reshards on load, which is what lets a checkpoint load into any layout.
A rank holding several pipeline stages saves and loads them together. A save is a
write and a commit: the write may go on in the background (`write(background=True)`,
DCP's async save after copying the state) while training continues, and the commit
follows once it is done.
"""

from __future__ import annotations

import io
import json
import os
import random
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
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


def step_of(folder: str) -> int | None:
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    suffix = name.removeprefix(PREFIX)
    return int(suffix) if name.startswith(PREFIX) and suffix.isdigit() else None


@dataclass
class PendingSave:
    """A checkpoint whose shards are written, or being written, but not committed."""

    step: int
    meta: dict
    future: Future | None = None  # the background write, if there is one

    def written(self) -> bool:
        return self.future is None or self.future.done()


class CheckpointStore:
    """The checkpoints of one run, in one folder: a local path or an fsspec URI
    (`s3://bucket/run`, `gs://...`; needs s3fs / gcsfs, e.g. `pip install raytron[s3]`)."""

    def __init__(self, directory: str | Path, keep_last: int):
        self.fs, self.root = fsspec.core.url_to_fs(str(directory))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.keep_last = keep_last

    def folder(self, step: int) -> str:
        return f"{self.root}/{PREFIX}{step:08d}"

    def checkpoint_id(self, step: int) -> str:
        """What DCP writes to: a path, or a URI DCP hands to fsspec."""
        folder = self.folder(step)
        return folder if self.local else self.fs.unstrip_protocol(folder)

    def committed_steps(self) -> list[int]:
        if not self.fs.isdir(self.root):
            return []
        steps = []
        for folder in self.fs.ls(self.root, detail=False):
            step = step_of(folder)
            if step is not None and self.fs.exists(f"{folder}/{COMMIT_MARKER}"):
                steps.append(step)
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def meta(self, step: int) -> dict:
        return json.loads(self.fs.cat_file(f"{self.folder(step)}/{META_FILE}"))

    def save(self, step: int, parts: list[torch.nn.Module],
             optimizers: list[torch.optim.Optimizer], scheduler, meta: dict,
             before_commit: Callable[[], None] | None = None) -> None:
        """Collective: write and commit, synchronously."""
        self.commit(self.write(step, parts, optimizers, scheduler, meta), before_commit)

    def write(self, step: int, parts: list[torch.nn.Module],
              optimizers: list[torch.optim.Optimizer], scheduler, meta: dict,
              background: bool = False, group: dist.ProcessGroup | None = None
              ) -> PendingSave:
        """Collective: every rank writes its shards of `step`, not yet committed. In the
        `background`, the write goes on in a thread once the state is copied (training may
        then change the parameters), coordinating ranks on `group`: a gloo group of its
        own, apart from the training's collectives."""
        folder = self.folder(step)
        if rank() == 0 and self.fs.exists(folder):  # the leftover of a save that crashed
            self.fs.rm(folder, recursive=True)
        barrier()
        state, _ = training_state(parts, optimizers, scheduler)
        future = None
        if not background:
            dcp.save(state, checkpoint_id=self.checkpoint_id(step))
        else:
            future = dcp.async_save(state, checkpoint_id=self.checkpoint_id(step),
                                    process_group=group, no_dist=not dist.is_initialized())
        buffer = io.BytesIO()
        torch.save(rng_state(), buffer)
        self.fs.makedirs(folder, exist_ok=True)  # a background write may not have yet
        self.fs.pipe_file(f"{folder}/rng_rank{rank()}.pt", buffer.getvalue())
        return PendingSave(step, {"step": step, **meta}, future)

    def commit(self, pending: PendingSave,
               before_commit: Callable[[], None] | None = None) -> None:
        """Collective: once every rank's write is done, rank 0 commits and prunes.
        `before_commit` runs on every rank just before (fault drills use it)."""
        if pending.future is not None:
            pending.future.result()  # raises what the background write raised
        if before_commit is not None:
            before_commit()
        barrier()
        if rank() == 0:
            folder = self.folder(pending.step)
            write_atomically(self.fs, f"{folder}/{META_FILE}", json.dumps(pending.meta, indent=2))
            write_atomically(self.fs, f"{folder}/{COMMIT_MARKER}", "")
            self.prune(keep=pending.step)
        barrier()

    def load(self, step: int, parts: list[torch.nn.Module],
             optimizers: list[torch.optim.Optimizer], schedulers: list) -> dict:
        """Collective: restore model, optimizer, schedulers and this rank's RNG; returns meta."""
        state, keys = training_state(parts, optimizers, schedulers[0])
        dcp.load(state, checkpoint_id=self.checkpoint_id(step))
        for part, optimizer, (model_keys, optim_keys) in zip(parts, optimizers, keys,
                                                            strict=True):
            set_model_state_dict(part, {k: state["model"][k] for k in model_keys})
            set_optimizer_state_dict(part, optimizer,
                                     {k: state["optim"][k] for k in optim_keys}, options=FLAT)
        for scheduler in schedulers:
            scheduler.load_state_dict(state["scheduler"])
        rng_file = f"{self.folder(step)}/rng_rank{rank()}.pt"
        if self.fs.exists(rng_file):  # a rank new to this layout keeps its seed
            set_rng_state(torch.load(io.BytesIO(self.fs.cat_file(rng_file)), weights_only=False))
        return self.meta(step)

    def load_latest(self, parts: list[torch.nn.Module],
                    optimizers: list[torch.optim.Optimizer], schedulers: list) -> dict:
        """Collective: load the newest committed checkpoint that reads back whole; a
        corrupted or incomplete one is skipped with a warning. {} when there is none.
        DCP raises on every rank when any rank fails to read, so ranks agree."""
        for step in reversed(self.committed_steps()):
            try:
                return self.load(step, parts, optimizers, schedulers)
            except (Exception, CheckpointException) as error:  # damaged: take the one before
                if rank() == 0:
                    warnings.warn(f"checkpoint step {step} in {self.root} cannot be loaded "
                                  f"({type(error).__name__}: {str(error)[:200]}); trying the "
                                  "previous one", stacklevel=2)
        return {}

    def prune(self, keep: int) -> None:
        """Delete committed checkpoints beyond `keep_last` and leftovers of failed saves."""
        survivors = set(self.committed_steps()[-self.keep_last :]) | {keep}
        for folder in self.fs.ls(self.root, detail=False):
            step = step_of(folder)
            if step is None or step in survivors:
                continue
            marker = f"{folder}/{COMMIT_MARKER}"
            if self.fs.exists(marker):
                self.fs.rm(marker)  # uncommit first, then delete
            self.fs.rm(folder, recursive=True)


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


def write_atomically(fs, path: str, text: str) -> None:
    """Local: write a temporary file, fsync, rename. Object storage: one PUT, which is
    atomic by itself."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, text.encode())
        return
    temporary = f"{path}.tmp"
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
