"""Failure drills and the per-rank watchdog.

`faults.inject` entries make a run fail on purpose, each once per run (a marker beside
the checkpoints remembers that it fired, so the restarted group does not fire it
again):

    kill rank R at step S                    the rank's process dies (SIGKILL)
    hang rank R at step S                    the rank stops making progress
    raise in rank R at step S                the rank raises an exception
    raise in rank R during checkpoint at step S   ... after writing its shards, before
                                                  the checkpoint is committed

The watchdog fails a rank that has not finished a step for `faults.hang_timeout_s`,
much sooner than the 30-minute default of a stuck collective.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

ENTRY = re.compile(
    r"^\s*(?P<kind>kill|hang|raise in) rank (?P<rank>\d+)"
    r"(?P<checkpoint> during checkpoint)? at step (?P<step>\d+)\s*$"
)
FIRED_DIR = "faults"


@dataclass(frozen=True)
class Injection:
    index: int  # position in faults.inject: names its marker
    kind: str  # kill | hang | raise
    rank: int
    step: int
    during_checkpoint: bool = False

    def describe(self) -> str:
        where = " during the checkpoint" if self.during_checkpoint else ""
        return f"injected {self.kind} of rank {self.rank}{where} at step {self.step}"


def parse_injections(entries: list[str]) -> list[Injection]:
    """Parsed entries; raises ValueError naming the first that does not parse."""
    parsed = []
    for index, entry in enumerate(entries):
        match = ENTRY.match(entry)
        if not match or (match["checkpoint"] and match["kind"] != "raise in"):
            raise ValueError(
                f"faults.inject.{index}='{entry}' is not a drill. Fix: write e.g. 'kill rank 1 "
                "at step 7', 'hang rank 0 at step 5', 'raise in rank 2 at step 3' or 'raise in "
                "rank 0 during checkpoint at step 10'."
            )
        kind = "raise" if match["kind"] == "raise in" else match["kind"]
        parsed.append(Injection(index, kind, int(match["rank"]), int(match["step"]),
                                bool(match["checkpoint"])))
    return parsed


class FaultInjector:
    """A rank's drills; `fs`/`root` hold the markers (where the checkpoints are)."""

    def __init__(self, entries: list[str], rank: int, fs, root: str, describe_rank: str):
        self.pending = [i for i in parse_injections(entries) if i.rank == rank]
        self.fs, self.folder = fs, f"{root}/{FIRED_DIR}"
        self.describe_rank = describe_rank

    def at_step(self, step: int, during_checkpoint: bool = False) -> None:
        for injection in self.pending:
            if (injection.step, injection.during_checkpoint) == (step, during_checkpoint):
                self.fire(injection)

    def fire(self, injection: Injection) -> None:
        marker = f"{self.folder}/{injection.index}"
        if self.fs.exists(marker):
            return
        self.fs.makedirs(self.folder, exist_ok=True)
        self.fs.pipe_file(marker, injection.describe().encode())
        print(f"raytron: {self.describe_rank}: {injection.describe()}", file=sys.stderr,
              flush=True)
        if injection.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if injection.kind == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(injection.describe())


class Watchdog:
    """Kills its own process when the rank finishes no step for `timeout` seconds, so
    that a hang becomes a failure the controller restarts from."""

    def __init__(self, timeout: float, describe_rank: str):
        self.timeout, self.describe_rank = timeout, describe_rank
        self.last = time.monotonic()
        threading.Thread(target=self.watch, daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 10))
            if time.monotonic() - self.last > self.timeout:
                print(f"raytron: {self.describe_rank} made no progress for {self.timeout:g} s "
                      "(faults.hang_timeout_s); failing it so the run restarts",
                      file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
