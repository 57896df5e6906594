"""A rank's side of the in-memory snapshots (`storage/snapshots.py`): hand its share of
a finished step to its node's keeper and the next node's, and read it back when a
restarted group starts from it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from raytron.platform.storage.checkpoint import (
    Resumed,
    apply_training_state,
    first_of_all_ranks,
    training_state,
)
from raytron.platform.storage.rng_state import parse_rng_state, rng_state_json, set_rng_state
from raytron.platform.storage.snapshots import Share, restore_into, share_of

PEER_TIMEOUT_S = 60.0  # the longest a rank waits for the next node's copy of its share


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
