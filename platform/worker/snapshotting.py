"""A rank's side of the in-memory snapshots (`storage/snapshots.py`): hand its share of
a finished step to its node's keeper and the next node's, and read it back when a
restarted group starts from it."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from raytron.platform.storage.checkpoint import (
    HostCopy,
    Resumed,
    apply_training_state,
    first_of_all_ranks,
    training_state,
)
from raytron.platform.storage.rng_state import parse_rng_state, rng_state_json, set_rng_state
from raytron.platform.storage.snapshots import Share

PEER_TIMEOUT_S = 60.0  # the longest a rank waits for the next node's copy of its share
FETCH_AGAIN_S = 0.05  # how often a joining replica asks again for a share on its way


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
    for section, entries in state.items():
        for key, tensor in entries.items():
            local(tensor).detach().copy_(tensor_of(share, f"{section}/{key}"))
    return None


def tensor_of(share: Share, name: str) -> torch.Tensor:
    """The tensor `name` of `share`, a view of its array (read-only in the object store:
    only ever read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tensor = torch.from_numpy(share.tensors[name])
    return tensor.view(torch.bfloat16) if share.dtypes[name] == "bfloat16" else tensor


def on_host(state: dict[str, dict[str, torch.Tensor]], share: Share
            ) -> dict[str, dict[str, torch.Tensor]]:
    """`state` (`checkpoint.training_state`) as `share` holds it, for a checkpoint to write:
    each tensor a view of the share's array, a sharded one a DTensor of its own mesh and
    placements."""
    host: dict[str, dict[str, torch.Tensor]] = {}
    for section, entries in state.items():
        host[section] = {}
        for key, tensor in entries.items():
            copy = tensor_of(share, f"{section}/{key}")
            if isinstance(tensor, DTensor):
                copy = DTensor.from_local(copy, tensor.device_mesh, tensor.placements,
                                          run_check=False, shape=tensor.shape,
                                          stride=tensor.stride())
            host[section][key] = copy
    return host



class Snapshotter:
    def __init__(self, keepers: dict[str, Any], node: str, rank: int, layout: str):
        nodes = sorted(keepers)
        self.home = keepers.get(node)
        after = [n for n in nodes if n > node] + [n for n in nodes if n < node]
        self.peer = keepers[after[0]] if after else None  # on the next node, round the ring
        self.others = [keepers[n] for n in after]
        self.rank, self.layout = rank, layout
        self.handing: Future | None = None  # the hand-over in flight, if any
        self.kept: tuple[int, dict, str, Future] | None = None  # step, state, rng, put: for
        # a checkpoint of that step
        self.mover = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self.waited_s = 0.0  # what `settle` waited since the last `take`
        self.stall_s: float | None = None  # how long the last snapshot held training up

    def take(self, step: int, parts: list[torch.nn.Module],
             optimizers: list[torch.optim.Optimizer], meta: dict, keep: bool = False) -> None:
        """Start handing this rank's share of `step` to both keepers (no collective), in a
        thread, while the next step computes: the share reads the state in place, so
        `settle` must come before the next update changes it. `keep` it for a checkpoint
        of `step` (`host_copy`)."""
        if self.home is None:
            return
        self.settle()
        started = time.perf_counter()
        state, _ = training_state(parts, optimizers)
        put: Future = Future()
        rng = rng_state_json()
        self.handing = self.mover.submit(self.hand_over, step, state, rng, meta, put)
        self.kept = (step, state, rng, put) if keep else None
        self.stall_s = self.waited_s + time.perf_counter() - started
        self.waited_s = 0.0

    def hand_over(self, step: int, state: dict[str, dict[str, torch.Tensor]], rng: str,
                  meta: dict, put: Future) -> None:
        """Put the share in the object store once, for both keepers (its reference on
        `put` once there, for a checkpoint to write it meanwhile); back once both hold it,
        so that the step survives this process and this node. A peer that fails is left
        out until the next group."""
        import ray

        try:
            share = ray.put(share_of(state, rng, meta))
        except BaseException as error:
            put.set_exception(error)
            raise
        put.set_result(share)
        held = self.home.hold.remote(step, self.rank, self.layout, share)
        if self.peer is not None:
            try:
                ray.get(self.peer.hold.remote(step, self.rank, self.layout, share),
                        timeout=PEER_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):  # lost with its node
                self.peer = None
        ray.get(held)

    def settle(self) -> None:
        """Wait until the keepers hold the share in flight (raising what handing it over
        raised): before the state changes, and before a drill ends this rank."""
        handing, self.handing = self.handing, None
        if handing is not None:
            started = time.perf_counter()
            handing.result()
            self.waited_s += time.perf_counter() - started

    def host_copy(self, step: int) -> HostCopy | None:
        """The share of `step`, if it was taken to `keep`, for the checkpoint of `step`:
        at once, its state resolved once the share is in the object store (the keepers
        may still be copying it), for the checkpoint to be written from, with no copy of
        its own."""
        kept, self.kept = self.kept, None
        if kept is None or kept[0] != step:
            return None
        _, state, rng, put = kept
        copied: Future = Future()

        def from_store(put: Future) -> None:  # in the hand-over thread, once it put the share
            import ray

            try:
                copied.set_result(on_host(state, ray.get(put.result())))
            except BaseException as error:
                copied.set_exception(error)

        put.add_done_callback(from_store)
        return HostCopy(copied, rng)

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

    def fetch(self, step: int, coming: Callable[[], bool] | None = None) -> Share | None:
        """This rank's share of `step` from whichever keeper has it; waited for while
        `coming()` says the rank that takes it may still be handing it over (at most
        PEER_TIMEOUT_S)."""
        deadline = time.monotonic() + PEER_TIMEOUT_S
        while True:
            going_on = coming is not None and time.monotonic() < deadline and coming()
            share = next((share for share in self.answers("fetch", step, self.rank)
                          if share is not None), None)
            if share is not None or not going_on:  # asked once more after it stopped
                return share
            time.sleep(FETCH_AGAIN_S)

    def restore(self, step: int, parts: list[torch.nn.Module],
                optimizers: list[torch.optim.Optimizer],
                coming: Callable[[], bool] | None = None) -> tuple[Resumed | None, str | None]:
        """Collective: every rank loads its share of `step` (waited for while `coming()`),
        or none does (why, then)."""
        share = self.fetch(step, coming)
        state, keys = training_state(parts, optimizers)
        problem = "no keeper holds it" if share is None else restore_into(state, share)
        problem = first_of_all_ranks(problem)
        if problem:
            return None, problem
        apply_training_state(parts, optimizers, state, keys)
        set_rng_state(parse_rng_state(share.rng))
        return Resumed(step, share.meta), None
