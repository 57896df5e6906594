"""A rank's side of the in-memory snapshots (`storage/snapshots.py`): hand its share of
a finished step to its node's keeper and the next node's, and read it back when a
restarted group starts from it."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from raytron.platform.storage.checkpoint import (
    Resumed,
    apply_training_state,
    first_of_all_ranks,
    training_state,
)
from raytron.platform.storage.rng_state import parse_rng_state, rng_state_json, set_rng_state
from raytron.platform.storage.snapshots import Share

PEER_TIMEOUT_S = 60.0  # the longest a rank waits for the next node's copy of its share


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def share_of(state: dict[str, dict[str, torch.Tensor]], rng: str, meta: dict) -> Share:
    """This rank's shard of `state` (`checkpoint.training_state`) on the host: numpy views
    where the tensors already are there (the object store copies them when they are put),
    bfloat16 viewed as int16 since numpy has no bfloat16."""
    tensors, dtypes = {}, {}
    for section, entries in state.items():
        for key, tensor in entries.items():
            host = local(tensor).detach().cpu()
            name = f"{section}/{key}"
            dtypes[name] = str(host.dtype).removeprefix("torch.")
            if host.dtype == torch.bfloat16:
                host = host.view(torch.int16)
            tensors[name] = host.numpy()
    return Share(tensors, dtypes, rng, meta)


def restore_into(state: dict[str, dict[str, torch.Tensor]], share: Share) -> str | None:
    """Copy `share` into `state`'s tensors in place; why it cannot be (another model or
    layout wrote it), or None once copied."""
    names = {f"{section}/{key}" for section, entries in state.items() for key in entries}
    if names != set(share.tensors):
        missing = sorted(names - set(share.tensors))[:3] or sorted(set(share.tensors) - names)[:3]
        return f"the snapshot holds other tensors than this rank's state ({', '.join(missing)})"
    for section, entries in state.items():
        for key, tensor in entries.items():
            target, name = local(tensor), f"{section}/{key}"
            array, dtype = share.tensors[name], str(target.dtype).removeprefix("torch.")
            if tuple(array.shape) != tuple(target.shape) or share.dtypes[name] != dtype:
                return (f"{name} is {share.dtypes[name]} {tuple(array.shape)} in the snapshot, "
                        f"{dtype} {tuple(target.shape)} here")
    with warnings.catch_warnings():  # the store's arrays are read-only; they are only read
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        for section, entries in state.items():
            for key, tensor in entries.items():
                target, name = local(tensor), f"{section}/{key}"
                source = torch.from_numpy(share.tensors[name])
                if target.dtype == torch.bfloat16:
                    source = source.view(torch.bfloat16)
                target.detach().copy_(source)
    return None



class Snapshotter:
    def __init__(self, keepers: dict[str, Any], node: str, rank: int, layout: str):
        nodes = sorted(keepers)
        self.home = keepers.get(node)
        after = [n for n in nodes if n > node] + [n for n in nodes if n < node]
        self.peer = keepers[after[0]] if after else None  # on the next node, round the ring
        self.others = [keepers[n] for n in after]
        self.rank, self.layout = rank, layout
        self.stall_s: float | None = None  # how long the last hand-over held the step up

    def take(self, step: int, parts: list[torch.nn.Module],
             optimizers: list[torch.optim.Optimizer], meta: dict) -> None:
        """Hand over this rank's share of `step` (no collective; before the next update),
        to both keepers at once; back once both hold it, so that the step survives this
        process and this node. A peer that fails is left out until the next group."""
        import ray

        if self.home is None:
            return
        started = time.perf_counter()
        state, _ = training_state(parts, optimizers)
        share = ray.put(share_of(state, rng_state_json(), meta))  # once, for both keepers
        held = self.home.hold.remote(step, self.rank, self.layout, share)
        if self.peer is not None:
            try:
                ray.get(self.peer.hold.remote(step, self.rank, self.layout, share),
                        timeout=PEER_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):  # lost with its node
                self.peer = None
        ray.get(held)
        self.stall_s = time.perf_counter() - started

    def answers(self, method: str, *args: Any) -> Iterator[Any]:
        """What each keeper answers to `method`, its own node's first; one lost with its
        node is skipped."""
        import ray

        for keeper in [k for k in (self.home, *self.others) if k is not None]:
            try:
                yield ray.get(getattr(keeper, method).remote(*args))
            except ray.exceptions.RayError:
                continue

    def newest(self) -> int | None:
        """The newest step of which some live keeper holds this rank's share."""
        return max((step for held in self.answers("held") for step, rank, layout in held
                    if rank == self.rank and layout == self.layout), default=None)

    def fetch(self, step: int) -> Share | None:
        """This rank's share of `step` from whichever keeper still has it."""
        return next((share for share in self.answers("fetch", step, self.rank)
                     if share is not None), None)

    def restore(self, step: int, parts: list[torch.nn.Module],
                optimizers: list[torch.optim.Optimizer]) -> tuple[Resumed | None, str | None]:
        """Collective: every rank loads its share of `step`, or none does (why, then)."""
        share = self.fetch(step)
        state, keys = training_state(parts, optimizers)
        problem = "no keeper holds it" if share is None else restore_into(state, share)
        problem = first_of_all_ranks(problem)
        if problem:
            return None, problem
        apply_training_state(parts, optimizers, state, keys)
        set_rng_state(parse_rng_state(share.rng))
        return Resumed(step, share.meta), None
