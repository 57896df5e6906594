"""The failure drills of `faults.inject`: each entry makes a run fail on purpose once.

    kill rank R at step S                    the rank's process dies (SIGKILL)
    hang rank R at step S                    the rank stops making progress
    raise in rank R at step S                the rank raises an exception
    raise in rank R during checkpoint at step S   ... after writing its shards, before
                                                  the checkpoint is committed
    lose the node of rank R at step S        the node's raylet dies, and every worker on it
    lose a node at step S                    ... the node of the last rank

Losing a node needs a cluster of several nodes (`cluster.address`). `worker/faults.py`
fires them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ENTRY = re.compile(
    r"^\s*(?:(?P<kind>kill|hang|raise in) rank (?P<rank>\d+)(?P<checkpoint> during checkpoint)?"
    r"|lose (?:a node|the node of rank (?P<node_rank>\d+))) at step (?P<step>\d+)\s*$"
)
LAST_RANK = -1
FIRED_DIR = "faults"


@dataclass(frozen=True)
class Injection:
    index: int  # position in faults.inject: names its marker
    kind: str  # kill | hang | raise | lose
    rank: int  # LAST_RANK: the last rank of the layout
    step: int
    during_checkpoint: bool = False

    def describe(self) -> str:
        where = " during the checkpoint" if self.during_checkpoint else ""
        rank = "the last rank" if self.rank == LAST_RANK else f"rank {self.rank}"
        what = f"loss of the node of {rank}" if self.kind == "lose" else f"{self.kind} of {rank}"
        return f"injected {what}{where} at step {self.step}"


def parse_injections(entries: list[str]) -> list[Injection]:
    """Parsed entries; raises ValueError naming the first that does not parse."""
    return [parse_injection(index, entry) for index, entry in enumerate(entries)]


def parse_injection(index: int, entry: str) -> Injection:
    """Entry `index` of faults.inject; raises ValueError naming it when it does not parse."""
    match = ENTRY.match(entry) if isinstance(entry, str) else None
    if not match or (match["checkpoint"] and match["kind"] != "raise in"):
        raise ValueError(
            f"faults.inject.{index}={entry!r} is not a drill. Fix: write e.g. 'kill rank 1 "
            "at step 7', 'hang rank 0 at step 5', 'raise in rank 2 at step 3', 'raise in "
            "rank 0 during checkpoint at step 10' or 'lose a node at step 12'."
        )
    if match["kind"] is None:
        rank = LAST_RANK if match["node_rank"] is None else int(match["node_rank"])
        return Injection(index, "lose", rank, int(match["step"]))
    kind = "raise" if match["kind"] == "raise in" else match["kind"]
    return Injection(index, kind, int(match["rank"]), int(match["step"]),
                     bool(match["checkpoint"]))
