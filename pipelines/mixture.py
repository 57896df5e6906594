"""Blending sources into one stream of training sequences (Megatron's blended datasets).

Each source has its own document stream and packer; the next sequence comes from the
source whose share of the sequences so far lags its weight the most, so the shares
track the weights to within one sequence at every point, deterministically. A source
that reaches its epoch limit leaves the blend; the others fill its place. The cursor
holds each source's position and the per-source counts, so a resumed run continues
the exact same blend.
"""

from __future__ import annotations

import numpy as np

from raytron.pipelines.packing import Cursor, Packed
from raytron.pipelines.stream import StreamSpec, token_docs


class DataExhausted(RuntimeError):
    """Every source reached its epoch limit before the run's last step."""


def kept(step: int) -> str:
    """What a run that the data ended after `step` (committed) keeps, in words."""
    return f"step {step} is checkpointed" if step else "nothing was trained"


def ran_out(step: int, steps: int) -> DataExhausted:
    """What ends a run whose data ran out after `step` (committed) of `steps`."""
    return DataExhausted(
        f"the data ran out after step {step} of train.steps={steps}: every source with an "
        f"epoch limit (data.sources.<i>.epochs) was read to its end; {kept(step)}. Fix: "
        "train.steps=auto trains exactly the steps the data gives; or raise the sources' "
        "epochs, or lower train.steps.")


def choose_source(weights: list[float], taken: list[int], active: list[bool]) -> int:
    """The active source furthest below its weight's share after one more sequence."""
    total = sum(taken) + 1
    deficits = [w * total - t if a else -np.inf
                for w, t, a in zip(weights, taken, active, strict=True)]
    return int(np.argmax(deficits))  # ties go to the first source


class MixtureReader:
    """The blended sequences of every source, from a cursor (a checkpoint's, or {})."""

    def __init__(self, spec: StreamSpec, seq_len: int, cursor: dict):
        count = len(spec.sources)
        positions = cursor.get("sources") or [{}] * count
        self.taken = list(cursor.get("taken") or [0] * count)
        self.skipped = [dict(s) for s in cursor.get("skipped") or [{}] * count]
        self.weights = spec.weights()
        self.sources = spec.sources
        self.streams, self.packers = [], []
        for index, (source, position) in enumerate(zip(spec.sources, positions, strict=True)):
            if position is None:  # exhausted before the checkpoint
                self.streams.append(None)
                self.packers.append(None)
                continue
            start = Cursor(**position)
            docs = token_docs(spec, source, index, start, spec.training_keeps)
            self.streams.append(docs)
            self.packers.append(spec.packer(docs, seq_len, start if position else None,
                                            self.skipped[index]))

    def cursor(self) -> dict:
        """Where the next sequence of every source begins, the sequences taken from each,
        and the records each skipped before it (by reason)."""
        positions = []
        for index, packer in enumerate(self.packers):
            try:
                positions.append(packer.cursor().to_dict() if packer else None)
            except StopIteration:
                self.retire(index)
                positions.append(None)
            if self.packers[index] is not None:
                self.skipped[index] = dict(self.packers[index].skipped)
        return {"sources": positions, "taken": list(self.taken),
                "skipped": [dict(s) for s in self.skipped]}

    def next_sequence(self) -> np.ndarray | Packed:
        while any(self.packers):
            index = choose_source(self.weights, self.taken, [p is not None for p in self.packers])
            try:
                sequence = self.packers[index].next_sequence()
            except StopIteration:
                self.retire(index)
                continue
            self.taken[index] += 1
            return sequence
        raise DataExhausted(
            "every source reached its epoch limit (data.sources.<i>.epochs) before "
            "train.steps. Fix: raise the limits, leave one source unlimited, or lower "
            "train.steps."
        )

    def limited_sources_left(self) -> bool:
        """Whether a source with an epoch limit may still give a sequence."""
        return any(packer is not None and source.epochs is not None
                   for packer, source in zip(self.packers, self.sources, strict=True))

    def retire(self, index: int) -> None:
        self.skipped[index] = dict(self.packers[index].skipped)
        self.streams[index].close()
        self.streams[index] = self.packers[index] = None

    def close(self) -> None:
        for stream in self.streams:
            if stream is not None:
                stream.close()
