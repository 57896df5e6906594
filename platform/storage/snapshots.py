"""In-memory snapshots of the training state, kept off the training processes (after
Gemini, SOSP '23): a restart loads the last finished step from memory instead of the
last persistent checkpoint, so a failure between two checkpoints loses no steps.

Every `checkpoint.memory_interval` steps each rank hands its shard of the state (the
tensors a checkpoint saves, its RNG, the data cursor) to the snapshot keeper of its
node: a Ray actor that copies it into its own memory, so that the copy outlives the
worker process; the keeper of the next node copies it too, so that the loss of a whole
node leaves one. The hand-over goes on in a thread while the next step computes (the
share reads the state in place; the step waits for both copies before its update
changes it): a process failure, or a node's, loses no finished step but the one being
handed over. A keeper holds each rank's two newest steps: while a step is being handed
over, the one before is still whole. A snapshot is usable only in the layout that wrote
it (a resize commits a persistent checkpoint first) and only when every rank's share of
one step survived. A persistent checkpoint of a step that has a snapshot is written from
the share in the object store, with no copy of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KEPT_PER_RANK = 2  # the step being handed over, and the whole one before it


@dataclass
class Share:
    """One rank's part of a snapshot, as it travels: numpy arrays (zero-copy into the
    object store), their torch dtypes, the rank's RNG state (JSON) and the step's meta.
    Made and read by the ranks (`worker/snapshotting.py`); the keepers never import torch
    (seconds of every keeper's start)."""

    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
    rng: str
    meta: dict = field(default_factory=dict)


def copied(arrays: dict[str, np.ndarray], into: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """`arrays` copied into the buffers of `into` that match them (a rank's shares keep
    their shapes from step to step), else into new ones. Fresh memory costs more than the
    copy: ~2 s per GB to fault its pages in against ~0.2 s to copy into touched pages
    (measured on this project's 2-core machines)."""
    out = {}
    for name, array in arrays.items():
        buffer = into.get(name)
        if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
            buffer = np.empty_like(array)
        np.copyto(buffer, array)
        out[name] = buffer
    return out


class SnapshotKeeper:
    """Ray actor, one per node: holds ranks' shares by (step, rank) for one layout, copied
    into its own memory (a worker's objects go with the worker)."""

    def __init__(self) -> None:
        self.shares: dict[tuple[int, int], tuple[str, Share]] = {}  # (step, rank) -> layout, share
        self.spare: dict[int, dict[str, np.ndarray]] = {}  # rank -> buffers `retain` freed

    def hold(self, step: int, rank: int, layout: str, share: Share) -> None:
        """Keep a copy of `share`, in the buffers of the rank's oldest share once it has
        KEPT_PER_RANK of them (or those a restart left spare)."""
        mine = sorted(s for s, r in self.shares if r == rank)
        oldest = step if step in mine else mine[0] if len(mine) >= KEPT_PER_RANK else None
        recycled = self.spare.pop(rank, {}) if oldest is None \
            else self.shares.pop((oldest, rank))[1].tensors
        share.tensors = copied(share.tensors, recycled)
        self.shares[(step, rank)] = (layout, share)

    def held(self) -> list[tuple[int, int, str]]:
        """(step, rank, layout) of every share held."""
        return [(step, rank, layout) for (step, rank), (layout, _) in self.shares.items()]

    def fetch(self, step: int, rank: int) -> Share | None:
        held = self.shares.get((step, rank))
        return None if held is None else held[1]

    def retain(self, step: int | None, layout: str) -> None:
        """Drop every share but those of `step` in `layout` (a new worker group starts from
        it, and writes newer ones): nothing from another timeline can be mixed in later.
        The buffers of the others in `layout` stay, for the group's next shares."""
        kept: dict[tuple[int, int], tuple[str, Share]] = {}
        self.spare = {}
        for (at, rank), (written_in, share) in self.shares.items():
            if written_in == layout and at == step:
                kept[(at, rank)] = (written_in, share)
            elif written_in == layout:
                self.spare[rank] = share.tensors
        self.shares = kept
