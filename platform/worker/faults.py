"""Failure drills and the per-rank watchdog.

`faults.inject` entries (`config/drills.py`) make a run fail on purpose, each once per
run: a marker beside the checkpoints remembers that it fired, so the restarted group
does not fire it again. A drill whose rank did not compute its step (a replica being
replaced) fires at the first step after it that the rank computes, and once the rank's
in-memory snapshot of the step before is held: it shows the recovery from a finished
step, not the window of a hand-over. Losing a node never
takes the head node, which would take the whole cluster with it.

The watchdog fails a rank that has not finished a step for `faults.hang_timeout_s`,
much sooner than the 30-minute default of a stuck collective; the first step of a
worker group gets at least two minutes, a checkpoint save `faults.checkpoint_timeout_s`
and a validation `faults.eval_timeout_s`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from raytron.platform.config.drills import LAST_RANK, Injection, parse_injections
from raytron.platform.worker.stderr import say

FIRED_DIR = "faults"


class FaultInjector:
    """A rank's drills; `fs`/`root` hold the markers (where the checkpoints are)."""

    def __init__(self, entries: list[str], rank: int, world: int, fs, root: str,
                 describe_rank: str):
        self.pending = [i for i in parse_injections(entries)
                        if rank == (world - 1 if i.rank == LAST_RANK else i.rank)]
        self.fs, self.folder = fs, f"{root}/{FIRED_DIR}"
        self.describe_rank = describe_rank

    def due(self, step: int, during_checkpoint: bool = False) -> list[Injection]:
        """The drills due by `step`: those of `step`, and those of earlier steps that this
        rank did not compute (a replacement replica that joined after them)."""
        return [i for i in self.pending
                if i.step <= step and i.during_checkpoint == during_checkpoint]

    def at_step(self, step: int, during_checkpoint: bool = False) -> None:
        """Fire the drills `due` by `step`."""
        for injection in self.due(step, during_checkpoint):
            self.pending.remove(injection)
            self.fire(injection)

    def fire(self, injection: Injection) -> None:
        marker = f"{self.folder}/{injection.index}"
        if self.fs.exists(marker):
            return
        self.fs.makedirs(self.folder, exist_ok=True)
        self.fs.pipe_file(marker, injection.describe().encode())
        say(f"raytron: {self.describe_rank}: {injection.describe()}")
        if injection.kind == "lose":
            lose_this_node()
        if injection.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if injection.kind == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(injection.describe())


def lose_this_node() -> None:
    """Kill this node's raylet (a Ray worker's parent), which takes every Ray process on
    the node with it, as when a machine goes away."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    head = any(node["NodeID"] == node_id and "node:__internal_head__" in node["Resources"]
               for node in ray.nodes())
    if head:
        raise RuntimeError("the drill would lose the head node, and the whole cluster with "
                           "it; it loses a node only where workers run apart from the head")
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


FIRST_STEP_GRACE_S = 120.0  # the first step of a group warms up data, allocator, kernels


class Watchdog:
    """Kills its own process when the rank finishes no step for `timeout` seconds (the
    first step of a worker group gets at least FIRST_STEP_GRACE_S, a checkpoint save or a
    validation the budget `busy` gives it), so that a hang becomes a failure the
    controller restarts from (`then` says what follows). `stop` ends its thread."""

    def __init__(self, timeout: float, describe_rank: str, then: str):
        self.timeout, self.describe_rank, self.then = timeout, describe_rank, then
        self.allowed, self.doing = max(timeout, FIRST_STEP_GRACE_S), "made no progress"
        self.setting = "faults.hang_timeout_s"
        self.last = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.last, self.allowed = time.monotonic(), self.timeout
        self.doing, self.setting = "made no progress", "faults.hang_timeout_s"

    @contextlib.contextmanager
    def busy(self, doing: str, budget: float, setting: str):
        """Allow `budget` seconds for what the block does (`doing`, e.g. "was saving a
        checkpoint"; `setting` names the budget's key)."""
        self.last, self.allowed = time.monotonic(), budget
        self.doing, self.setting = doing, setting
        try:
            yield
        finally:
            self.beat()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def watch(self) -> None:
        while not self.stopped.wait(min(1.0, self.timeout / 10)):
            waited = time.monotonic() - self.last
            if waited > self.allowed:
                say(f"raytron: {self.describe_rank} {self.doing} for {waited:.0f} s "
                    f"({self.setting}); failing it so that {self.then}")
                os.kill(os.getpid(), signal.SIGKILL)
