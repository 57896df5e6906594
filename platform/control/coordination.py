"""Stopping a running worker group at a step boundary, with a checkpoint, on request:
the controller's side.

The controller asks the group to stop when the run can grow (capacity came back) or a
node hosting workers is being preempted (Ray drains a node before it goes: `ray start`
on SIGTERM, a KubeRay pod deletion, a spot interruption seen by the autoscaler). The
request goes to a `Coordinator` actor, which the workers' `StepBoundary`
(`worker/boundary.py`) polls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from raytron.platform.control.capacity import draining_nodes

WATCH_S = 0.5  # how often the controller looks at the group's nodes and their drains


class Coordinator:
    """Ray actor between the controller and the current worker group."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.reason: str | None = None
        self.rank_nodes: dict[int, str] = {}  # a replaced worker's rank moves
        self.error: BaseException | None = None

    def end_run(self, error: BaseException) -> None:
        """The group ended the run on purpose, for a reason no restart changes (its data
        ran out): the controller raises `error` instead of restarting it. Told this way,
        not raised in the workers, so that the console gets one line, not tracebacks."""
        self.error = error

    def run_ended_by(self) -> BaseException | None:
        return self.error

    def join(self, rank: int, node_id: str) -> None:
        self.rank_nodes[rank] = node_id

    def nodes(self) -> dict[str, list[int]]:
        """Node id -> the ranks (replica mode: the replicas) that started there."""
        nodes: dict[str, list[int]] = {}
        for rank, node in sorted(self.rank_nodes.items()):
            nodes.setdefault(node, []).append(rank)
        return nodes

    def ask_to_stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def stop_reason(self) -> str | None:
        return self.reason


class LaunchWatcher:
    """The controller's side, while one worker group runs: asks it to stop when a node
    that hosts its workers is draining, or (elastic runs below their largest size) when
    `room_to_grow` finds capacity, looked for every `capacity_check_s` once all `world`
    workers have joined (before, the group's own resources would look free). The request
    goes to the coordinator and, in replica mode, to the `quorum` that stops the replicas."""

    def __init__(self, coordinator, world: int, capacity_check_s: float,
                 room_to_grow: Callable[[], str | None] | None, quorum=None):
        self.coordinator, self.world, self.room_to_grow = coordinator, world, room_to_grow
        self.quorum = quorum
        self.capacity_check_s = capacity_check_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        import ray

        next_capacity_check = time.monotonic() + self.capacity_check_s
        while not self.stopped.wait(WATCH_S):
            nodes = ray.get(self.coordinator.nodes.remote())
            reason = draining_reason(nodes)
            joined = sum(len(ranks) for ranks in nodes.values()) == self.world
            if reason is None and self.room_to_grow and joined \
                    and time.monotonic() >= next_capacity_check:
                room = self.room_to_grow()
                reason = f"the run can grow to {room}" if room else None
                next_capacity_check = time.monotonic() + self.capacity_check_s
            if reason is not None:
                for told in (self.coordinator, self.quorum):
                    if told is not None:
                        told.ask_to_stop.remote(reason)
                return

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def draining_reason(node_ranks: dict[str, list[int]]) -> str | None:
    """Why to stop, when Ray is draining a node that hosts some of `node_ranks`'s ranks
    (its preemption notice); None otherwise."""
    for node_id, deadline_ms in draining_nodes().items():
        if node_id in node_ranks:
            left = f", {max(0.0, deadline_ms / 1000 - time.time()):.0f} s left" \
                if deadline_ms else ""
            return (f"node {node_id[:8]} (ranks {', '.join(map(str, node_ranks[node_id]))}) "
                    f"is being preempted{left}")
    return None
