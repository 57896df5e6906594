"""Stopping a running worker group at a step boundary, with a checkpoint, on request.

The controller asks the group to stop when the run can grow (capacity came back) or a
node hosting workers is being preempted (Ray drains a node before it goes: `ray start`
on SIGTERM, a KubeRay pod deletion, a spot interruption seen by the autoscaler). The
request goes to a `Coordinator` actor; rank 0 polls it in the background and, between
two steps, broadcasts one decision to every rank on a gloo group: stop now (after a
checkpoint), and whether a background checkpoint write has finished and may be
committed. Every rank thus acts at the same step, which a collective save needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

POLL_S = 0.5  # how often rank 0 looks for a request, and the controller for drains


class Coordinator:
    """Ray actor between the controller and the current worker group."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.reason: str | None = None
        self.node_ranks: dict[str, list[int]] = {}

    def join(self, rank: int, node_id: str) -> None:
        self.node_ranks.setdefault(node_id, []).append(rank)

    def nodes(self) -> dict[str, list[int]]:
        return self.node_ranks

    def ask_to_stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def stop_reason(self) -> str | None:
        return self.reason


@dataclass(frozen=True)
class Decision:
    commit: bool  # the background checkpoint write finished on every rank: commit it
    stop: bool  # checkpoint (if this step has none) and end this worker group


class StepBoundary:
    """A rank's side: `agree` is collective, called by every rank after every step."""

    def __init__(self, coordinator, rank: int):
        self.rank, self.coordinator = rank, coordinator
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.reason: str | None = None
        self.done = threading.Event()
        if rank == 0:
            threading.Thread(target=self.poll, daemon=True).start()

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


class LaunchWatcher:
    """The controller's side, while one worker group runs: asks it to stop when a node
    that hosts its workers is draining, or (elastic runs below their largest size) when
    `room_to_grow` finds capacity, looked for every `capacity_check_s` once all `world`
    workers have joined (before, the group's own resources would look free)."""

    def __init__(self, coordinator, world: int, capacity_check_s: float,
                 room_to_grow: Callable[[], str | None] | None):
        self.coordinator, self.world, self.room_to_grow = coordinator, world, room_to_grow
        self.capacity_check_s = capacity_check_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        import time

        import ray

        next_capacity_check = time.monotonic() + self.capacity_check_s
        while not self.stopped.wait(POLL_S):
            nodes = ray.get(self.coordinator.nodes.remote())
            reason = draining_reason(nodes)
            joined = sum(len(ranks) for ranks in nodes.values()) == self.world
            if reason is None and self.room_to_grow and joined \
                    and time.monotonic() >= next_capacity_check:
                room = self.room_to_grow()
                reason = f"the run can grow to {room}" if room else None
                next_capacity_check = time.monotonic() + self.capacity_check_s
            if reason is not None:
                self.coordinator.ask_to_stop.remote(reason)
                return

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def draining_reason(node_ranks: dict[str, list[int]]) -> str | None:
    """Why to stop, when Ray is draining a node that hosts some of `node_ranks`'s ranks
    (its preemption notice); None otherwise."""
    import time

    from raytron.platform.capacity import draining_nodes

    for node_id, deadline_ms in draining_nodes().items():
        if node_id in node_ranks:
            left = f", {max(0.0, deadline_ms / 1000 - time.time()):.0f} s left" \
                if deadline_ms else ""
            return (f"node {node_id[:8]} (ranks {', '.join(map(str, node_ranks[node_id]))}) "
                    f"is being preempted{left}")
    return None
