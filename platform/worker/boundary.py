"""Stopping a running worker group at a step boundary, with a checkpoint, on request:
each rank's side.

Rank 0 polls the controller's `Coordinator` actor in the background and, between two
steps, broadcasts one decision to every rank on a gloo group: stop now (after a
checkpoint), and whether a background checkpoint write has finished and may be
committed. Every rank thus acts at the same step, which a collective save needs. In
replica mode each replica is a group of its own: the quorum says when to stop
(`StopHere`), for all replicas at once, and the boundary polls nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

POLL_S = 0.5  # how often rank 0 looks for a request to stop


class StopHere(Exception):
    """Replica mode: the quorum stops the worker group before this step (the replicas'
    `StepBoundary` decides no stop of its own)."""


@dataclass(frozen=True)
class Decision:
    commit: bool  # the background checkpoint write finished on every rank: commit it
    stop: bool  # checkpoint (if this step has none) and end this worker group


class StepBoundary:
    """A rank's side: `agree` is collective, called by every rank after every step."""

    def __init__(self, coordinator, rank: int):
        """`coordinator`: None where requests to stop come another way (`StopHere`)."""
        self.rank, self.coordinator = rank, coordinator
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.reason: str | None = None
        self.done = threading.Event()
        self.poller = threading.Thread(target=self.poll, daemon=True) \
            if rank == 0 and coordinator is not None else None
        if self.poller is not None:
            self.poller.start()

    def poll(self) -> None:
        import ray

        while self.reason is None and not self.done.wait(POLL_S):
            self.reason = ray.get(self.coordinator.stop_reason.remote())

    def agree(self, write_finished: bool) -> Decision:
        """Rank 0's view, the same on every rank. Rank 0's background write finishes
        only after every rank's shards are written (DCP gathers them to finish)."""
        flags = torch.tensor([int(write_finished), int(self.reason is not None)])
        if self.group is not None:
            dist.broadcast(flags, src=0, group=self.group)
        return Decision(commit=bool(flags[0]), stop=bool(flags[1]))

    def close(self) -> None:
        self.done.set()
        if self.poller is not None:
            self.poller.join()
