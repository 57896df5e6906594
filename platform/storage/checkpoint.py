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
follows once it is done. The copy goes into buffers one stager keeps for the whole run
(pinned on a GPU, where it copies on a stream of its own): allocated at the first save,
reused by every later one.

Only tensors are saved (no optimizer hyperparameters, no scheduler: those come from
the config, so a change to them applies on resume); the step, cursor and RNG states
are JSON. Loading unpickles nothing (`safe_reading`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from raytron.platform.config.load import flatten
from raytron.platform.storage.rng_state import parse_rng_state, rng_state_json, set_rng_state
from raytron.platform.storage.safe_reading import TensorsOnlyPlanner, safe_reader

COMMIT_MARKER = "COMMITTED"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"  # the run's config, beside its checkpoints
MAX_CONFIG_BYTES = 1 << 20  # a saved config is data: never read more
PREFIX = "step_"
RNG_FILE = "rng_rank{rank}.json"
PICKLED_RNG_FILE = "rng_rank{rank}.pt"  # written by raytron before 0.2: never loaded
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)  # keyed by parameter name
# A frozen parameter (a LoRA run's base) is read from its source, never saved; on load
# every trained one is there (DCP raises for a key the checkpoint lacks), the frozen ones
# are not: hence not strict.
TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


def step_of(folder: str) -> int | None:
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    suffix = name.removeprefix(PREFIX)
    return int(suffix) if name.startswith(PREFIX) and suffix.isdigit() else None


class CheckpointUnreadable(RuntimeError):
    """Committed checkpoints exist and none of them loads: the run must not start over."""


@dataclass
class Resumed:
    """What `load_latest` loaded: the step, its meta, and the newer checkpoints it skipped."""

    step: int
    meta: dict
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (step, why)


@dataclass
class PendingSave:
    """A checkpoint whose shards are written, or being written, but not committed."""

    step: int
    meta: dict
    future: Future | None = None  # the background write, if there is one
    staged: Future | None = None  # its copy of the state, when that runs in the background
    group: dist.ProcessGroup | None = None  # the write's own group, ended once committed

    def written(self) -> bool:
        return self.future is None or self.future.done()

    def wait_for_copy(self) -> None:
        """Block until the state is copied: before the parameters next change."""
        if self.staged is not None:
            self.staged.result()


@dataclass
class HostCopy:
    """A step's `training_state` being copied off the live tensors (an in-memory
    snapshot's share, its future resolved once the copy is made) and its RNG state: a
    checkpoint of that step writes the copy as it is, with no copy of its own."""

    state: Future
    rng: str


class Awaiting:
    """DCP's `AsyncStager` for a `HostCopy`: its stage is the copy's future, which DCP's
    write thread waits for, so that the save returns before the copy is made."""

    should_synchronize_after_execute = False

    def __init__(self, copy: HostCopy):
        self.copy = copy

    def stage(self, state_dict: dict) -> Future:
        return self.copy.state

    def close(self) -> None:
        pass


class CheckpointStore:
    """The checkpoints of one run, in one folder: a local path or an fsspec URI
    (`s3://bucket/run`, `gs://...`; needs s3fs / gcsfs, e.g. `pip install raytron[s3]`)."""

    def __init__(self, directory: str | Path, keep_last: int,
                 leases: dict[str, str] | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(str(directory))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.keep_last = keep_last
        self.leases = leases or {}  # folder -> token this run's lease holds: checked by
        # rank 0 before it deletes or commits anything, so only the lease holder writes
        self.stager: DefaultStager | None = None  # background saves' copies, made once

    def staging(self) -> DefaultStager:
        """The run's stager: on a GPU it copies into pinned memory on its own stream,
        in a thread (`PendingSave.wait_for_copy` waits for it); on a CPU in place. Its
        buffers, keyed by the tensors they copy, are reused by every later save."""
        if self.stager is None:
            gpu = torch.cuda.is_available()
            self.stager = DefaultStager(StagingOptions(
                use_pinned_memory=gpu, use_shared_memory=False, use_async_staging=gpu,
                use_non_blocking_copy=gpu))
        return self.stager

    def close(self) -> None:
        """Free the stager's buffers (after the last save is committed)."""
        if self.stager is not None:
            self.stager.close()
            self.stager = None

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

    def claim(self, config_text: str) -> None:
        """Save the run's (redacted) config beside its checkpoints, once: which run they
        belong to (`saved_config`). Written when the folder has none, never changed
        after, so that a resume that fails leaves the folder as it was."""
        path = f"{self.root}/{CONFIG_FILE}"
        if not self.fs.exists(path):
            self.fs.makedirs(self.root, exist_ok=True)
            write_atomically(self.fs, path, config_text)

    def saved_config(self) -> dict | None:
        """The flattened config saved beside the checkpoints, read as plain YAML (no
        interpolation: it is data); None when there is none or it is no mapping."""
        path = f"{self.root}/{CONFIG_FILE}"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
        try:
            tree = yaml.safe_load(text) if len(text) <= MAX_CONFIG_BYTES else None
        except yaml.YAMLError:
            return None
        return flatten(tree) if isinstance(tree, dict) else None

    def intact(self, step: int) -> str | None:
        """Why the committed checkpoint at `step` cannot load, found without loading it (its
        meta, its DCP metadata, and every file that names at its full length); None when
        it looks whole. A damaged checkpoint does not count towards `keep_last`."""
        folder = self.folder(step)
        try:
            json.loads(self.fs.cat_file(f"{folder}/{META_FILE}"))
            metadata = safe_reader(self.checkpoint_id(step), self.local).read_metadata()
            sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry["size"]
                     for entry in self.fs.ls(folder, detail=True)}
        except (Exception, CheckpointException) as error:  # unreadable: damaged
            return reason(error)
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            name = str(info.relative_path)
            needed[name] = max(needed.get(name, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            if sizes.get(name, -1) < size:
                have = "missing" if name not in sizes else f"{sizes[name]} bytes"
                return f"{name} is {have}, its metadata needs {size} bytes"
        return None

    def save(self, step: int, parts: list[torch.nn.Module],
             optimizers: list[torch.optim.Optimizer], meta: dict,
             before_commit: Callable[[], None] | None = None) -> None:
        """Collective: write and commit, synchronously."""
        self.commit(self.write(step, parts, optimizers, meta), before_commit)

    def write(self, step: int, parts: list[torch.nn.Module],
              optimizers: list[torch.optim.Optimizer], meta: dict,
              background: bool = False, copy: HostCopy | None = None) -> PendingSave:
        """Collective: every rank writes its shards of `step`, not yet committed. In the
        `background`, the write goes on in a thread once the state is copied (training may
        then change the parameters); from `copy` when the state is copied already. Ranks
        coordinate on a group of the write's own (`passing_group`), apart from the
        training's collectives."""
        folder = self.folder(step)
        if rank() == 0:
            self.check_lease()
            if self.fs.exists(folder):  # the leftover of a save that crashed
                self.fs.rm(folder, recursive=True)
        barrier()
        future = staged = None
        group = passing_group()
        if not background:
            state = training_state(parts, optimizers)[0] if copy is None else copy.state.result()
            dcp.save(state, checkpoint_id=self.checkpoint_id(step), process_group=group)
            end_group(group)
            group = None
        else:  # from `copy`, DCP's thread waits for it: `{}` stands for the state it stages
            state = training_state(parts, optimizers)[0] if copy is None else {}
            future = dcp.async_save(state, checkpoint_id=self.checkpoint_id(step),
                                    process_group=group, no_dist=not dist.is_initialized(),
                                    async_stager=self.staging() if copy is None
                                    else Awaiting(copy))
            if isinstance(future, AsyncSaveResponse):
                future, staged = future.upload_completion, future.staging_completion
        self.fs.makedirs(folder, exist_ok=True)  # a background write may not have yet
        write_atomically(self.fs, f"{folder}/{RNG_FILE.format(rank=rank())}",
                         rng_state_json() if copy is None else copy.rng)
        return PendingSave(step, {"step": step, **meta}, future, staged, group)

    def commit(self, pending: PendingSave,
               before_commit: Callable[[], None] | None = None) -> None:
        """Collective: once every rank's write is done, rank 0 commits and prunes.
        `before_commit` runs on every rank just before (fault drills use it)."""
        if pending.future is not None:
            pending.future.result()  # raises what the background write raised
        end_group(pending.group)
        if before_commit is not None:
            before_commit()
        barrier()
        if rank() == 0:
            self.check_lease()
            folder = self.folder(pending.step)
            write_atomically(self.fs, f"{folder}/{META_FILE}", json.dumps(pending.meta, indent=2))
            write_atomically(self.fs, f"{folder}/{COMMIT_MARKER}", "")
            self.prune(keep=pending.step)
        barrier()

    def load(self, step: int, parts: list[torch.nn.Module],
             optimizers: list[torch.optim.Optimizer]) -> dict:
        """Collective: restore model, optimizer state and this rank's RNG; returns meta.
        Raises on every rank when any rank cannot read its part."""
        meta, rng, problem = {}, None, None
        try:  # the JSON files each rank reads alone: ranks agree before DCP's collective load
            meta, rng = self.meta(step), self.read_rng(step)
        except (OSError, ValueError) as error:  # JSONDecodeError is a ValueError
            problem = f"{type(error).__name__}: {error}"
        problem = first_of_all_ranks(problem)
        if problem:
            raise ValueError(problem)
        state, keys = training_state(parts, optimizers)
        group = passing_group()
        dcp.load(state, storage_reader=safe_reader(self.checkpoint_id(step), self.local),
                 planner=TensorsOnlyPlanner(), process_group=group)
        end_group(group)
        apply_training_state(parts, optimizers, state, keys)
        if rng is not None:
            set_rng_state(rng)
        return meta

    def read_model(self, step: int, names: Collection[str] | None = None
                   ) -> dict[str, torch.Tensor]:
        """The model's whole tensors at `step` (those in `names`, or all), read into this
        process whatever layout wrote them, without a process group."""
        metadata = safe_reader(self.checkpoint_id(step), self.local).read_metadata()
        state = {}
        for key, item in metadata.state_dict_metadata.items():
            name = key.removeprefix("model.")
            if key.startswith("model.") and isinstance(item, TensorStorageMetadata) \
                    and (names is None or name in names):
                state[name] = torch.empty(item.size, dtype=item.properties.dtype)
        with warnings.catch_warnings():  # that it reads in one process, which it is meant to
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load({"model": state}, planner=TensorsOnlyPlanner(), no_dist=True,
                     storage_reader=safe_reader(self.checkpoint_id(step), self.local))
        return state

    def read_rng(self, step: int) -> dict | None:
        """This rank's RNG state at `step`; None for a rank new to this layout, which keeps
        its seed. ValueError for a file that is not raytron's JSON."""
        folder = self.folder(step)
        path = f"{folder}/{RNG_FILE.format(rank=rank())}"
        if self.fs.exists(path):
            try:
                return parse_rng_state(self.fs.cat_file(path))
            except ValueError as error:
                raise ValueError(f"{path.rsplit('/', 1)[1]} is {error}") from None
        pickled = f"{folder}/{PICKLED_RNG_FILE.format(rank=rank())}"
        if self.fs.exists(pickled):
            raise ValueError(
                f"{pickled.rsplit('/', 1)[1]} is a pickle (an older raytron wrote it), and "
                "loading it could run any code; raytron loads JSON only. To resume with fresh "
                "random states, delete the rng_rank*.pt files of this checkpoint")
        return None

    def load_latest(self, parts: list[torch.nn.Module],
                    optimizers: list[torch.optim.Optimizer],
                    committed: list[int] | None = None) -> Resumed | None:
        """Collective: load the newest of the `committed` steps (listed once by the driver,
        so that every rank tries the same ones; default: listed here) that reads back whole,
        skipping damaged ones. None when nothing is committed; `CheckpointUnreadable`,
        naming each checkpoint and why, when something is and none loads (DCP raises on
        every rank when any rank fails to read, so ranks agree)."""
        skipped: list[tuple[int, str]] = []
        steps = self.committed_steps() if committed is None else committed
        for step in reversed(steps):
            try:
                return Resumed(step, self.load(step, parts, optimizers), skipped)
            except (Exception, CheckpointException) as error:  # damaged: take the one before
                skipped.append((step, reason(error)))
        if not skipped:
            return None
        raise self.unreadable(skipped)

    def newest_intact(self, committed: list[int]) -> int | None:
        """The newest of the `committed` steps that is not visibly damaged (`intact`; None
        when there are none), or `CheckpointUnreadable` when each is: the driver's check,
        so that such a run stops before it starts Ray."""
        damaged = []
        for step in reversed(committed):  # newest first: usually the only one read
            why = self.intact(step)
            if why is None:
                return step
            damaged.append((step, why))
        if damaged:
            raise self.unreadable(damaged)
        return None

    def unreadable(self, skipped: list[tuple[int, str]]) -> CheckpointUnreadable:
        return CheckpointUnreadable(
            f"none of the {len(skipped)} committed checkpoint(s) in {self.root} can be "
            "loaded:\n" + "\n".join(f"  step {step}: {why}" for step, why in skipped)
            + "\nNothing was deleted or overwritten. Fix: if the model code or its parameter "
            "names changed since they were written, run the version that wrote them, or "
            "start a new run.name; delete a damaged step_<N> folder to resume from the one "
            "before it.")

    def check_lease(self) -> None:
        """`LeaseLost` unless this run still holds the lease of each of its folders."""
        from raytron.platform.storage.lease import check_token

        for folder, token in self.leases.items():
            check_token(folder, token)

    def prune(self, keep: int) -> None:
        """Keep the newest `keep_last` committed checkpoints that look whole (`intact`),
        and `keep`; delete the committed ones older than those and every leftover of a
        failed save. A damaged checkpoint is not counted, so it never pushes out a good
        one; one newer than the oldest kept stays, for whoever wants to look at it."""
        kept: list[int] = []
        for step in reversed(self.committed_steps()):
            if len(kept) == self.keep_last:
                break
            if step == keep or self.intact(step) is None:
                kept.append(step)
        oldest = min([*kept, keep])
        for folder in self.fs.ls(self.root, detail=False):
            step = step_of(folder)
            if step is None or step == keep:
                continue
            marker = f"{folder}/{COMMIT_MARKER}"
            committed = self.fs.exists(marker)
            if committed and step >= oldest:
                continue
            if committed:
                self.fs.rm(marker)  # uncommit first, then delete
            self.fs.rm(folder, recursive=True)


def training_state(parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]
                   ) -> tuple[dict, list[tuple[list[str], dict[str, str], dict]]]:
    """The tensors DCP saves and loads; for each part, its model keys, its optimizer
    keys (each part's own key mapped to the checkpoint's), and its optimizer
    hyperparameters (param groups), which are not saved.

    A pipelined tied model's head keeps its optimizer state under the embedding's name,
    as the unsplit model, whose single matrix has one state, does: checkpoints then move
    between pipelined and unpipelined layouts."""
    model_state: dict = {}
    optim_state: dict = {}
    keys = []
    for part, optimizer in zip(parts, optimizers, strict=True):
        part_model = get_model_state_dict(part, options=TRAINED)
        part_optim = get_optimizer_state_dict(part, optimizer, options=FLAT)
        tensors = {k: v for k, v in part_optim.items() if isinstance(v, torch.Tensor)}
        groups = {k: v for k, v in part_optim.items() if k not in tensors}
        stored = {key: stored_optimizer_key(part, key) for key in tensors}
        model_state.update(part_model)
        optim_state.update({stored[key]: value for key, value in tensors.items()})
        keys.append((list(part_model), stored, groups))
    return {"model": model_state, "optim": optim_state}, keys


def apply_training_state(parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer],
                         state: dict, keys: list[tuple[list[str], dict[str, str], dict]]) -> None:
    """Set model and optimizer from `training_state`'s tensors, once they hold what was
    loaded into them."""
    for part, optimizer, (model_keys, optim_keys, groups) in zip(parts, optimizers, keys,
                                                                strict=True):
        set_model_state_dict(part, {k: state["model"][k] for k in model_keys}, options=TRAINED)
        loaded = {k: state["optim"][stored] for k, stored in optim_keys.items()}
        set_optimizer_state_dict(part, optimizer, {**loaded, **groups}, options=FLAT)


def stored_optimizer_key(part: torch.nn.Module, key: str) -> str:
    """The checkpoint's name for an optimizer state key of `part`."""
    head = "state.output.weight."
    if getattr(part, "head_is_a_copy", False) and key.startswith(head):
        return "state.tok_embeddings.weight." + key.removeprefix(head)
    return key


def reason(error: BaseException) -> str:
    """One line: why a checkpoint did not load (DCP's own error lists each rank's)."""
    if isinstance(error, CheckpointException):
        causes = {f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                  for e, _ in error.failures.values()}
        return "; ".join(sorted(causes))[:500]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def first_of_all_ranks(problem: str | None) -> str | None:
    """The first rank's problem, on every rank (collective): ranks then fail together."""
    if not dist.is_initialized():
        return problem
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def write_atomically(fs, path: str, text: str | bytes) -> None:
    """Local: write a temporary file, fsync it, rename it, fsync its directory (so that
    the name survives a power loss too). Object storage: one PUT, atomic by itself."""
    data = text.encode() if isinstance(text, str) else text
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def passing_group() -> dist.ProcessGroup | None:
    """A gloo group for one save or load (collective), None without a process group.

    DCP gathers every rank's plan as one pickled object, large enough that gloo's worker
    thread copies it with OpenMP, which gives that thread a team of its own: from then on
    the process has more OpenMP threads than CPUs, and libgomp makes every team sleep
    between parallel regions instead of spinning, which doubled a small model's step time
    on 2 CPU cores. The threads of a group ended after its save (`end_group`) go with it."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def end_group(group: dist.ProcessGroup | None) -> None:
    """End `passing_group`'s group once every rank is done with it (collective)."""
    if group is not None:
        barrier()
        dist.destroy_process_group(group)
