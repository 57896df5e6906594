"""Packing documents into fixed-length training sequences, with a cursor to resume from.

Documents are concatenated with EOS after each and cut into sequences of `seq_len + 1`
tokens; consecutive sequences share one boundary token (Megatron's GPT dataset), so
every token is a target exactly once. The cursor names the first token of the next
sequence by where it comes from (epoch, file, record, offset), not by a count, so
resuming reads from that file on without re-reading what came before.

Skipped records travel with the next document (`TokenDoc.skipped`) and are counted once
that document is the first of the packer's pending ones: the count then covers exactly
the records before the cursor, so a checkpoint can store it and a resumed run, which
re-reads from the cursor, never counts a record twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice

import numpy as np


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    file: int = 0  # position of the file in the epoch's file order
    doc: int = 0  # record index within that file
    offset: int = 0  # tokens of that document (EOS included) already consumed
    window: int = 0  # with a shuffle window: the window (epoch/file/doc: where it starts)
    skip: int = 0  # ... and how many of its shuffled documents come before this one

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenDoc:
    epoch: int
    file: int
    doc: int
    tokens: np.ndarray  # the document's ids followed by EOS
    resume: Cursor | None = None  # where a stream restarts to yield this document first
    skipped: dict[str, int] = field(default_factory=dict)  # records skipped just before it

    def position(self) -> Cursor:
        return self.resume or Cursor(self.epoch, self.file, self.doc)


class Packer:
    """Cuts a document stream into sequences of `seq_len + 1` tokens, counting the records
    skipped before the next sequence's start by reason (`skipped`). A packer resumed at a
    cursor (`resumed`) takes `skipped` as counted up to it, its first document included."""

    def __init__(self, docs: Iterator[TokenDoc], seq_len: int, first_offset: int = 0,
                 skipped: dict[str, int] | None = None, resumed: bool = False):
        self.docs = docs
        self.seq_len = seq_len
        self.pending: deque[TokenDoc] = deque()
        self.offset = first_offset  # consumed tokens of pending[0]
        self.skipped = dict(skipped or {})
        self.head_counted = resumed  # the first document's skipped records are in `skipped`

    def cursor(self) -> Cursor:
        """Where the next sequence starts."""
        self.fill(1)
        return replace(self.pending[0].position(), offset=self.offset)

    def next_sequence(self) -> np.ndarray:
        self.fill(self.seq_len + 1)
        pieces, needed, offset = [], self.seq_len + 1, self.offset
        for doc in self.pending:
            piece = doc.tokens[offset : offset + needed]
            pieces.append(piece)
            needed -= len(piece)
            offset = 0
            if needed == 0:
                break
        self.advance(self.seq_len)
        return np.concatenate(pieces)

    def fill(self, tokens: int) -> None:
        """Pull documents until `tokens` unconsumed tokens are pending."""
        available = sum(len(d.tokens) for d in self.pending) - self.offset
        while available < tokens:
            doc = next(self.docs)  # StopIteration ends the packer
            self.pending.append(doc)
            available += len(doc.tokens)
            self.count_head()

    def advance(self, tokens: int) -> None:
        while tokens:
            rest = len(self.pending[0].tokens) - self.offset
            if tokens < rest:
                self.offset += tokens
                return
            tokens -= rest
            self.pending.popleft()
            self.offset = 0
            self.head_counted = False
            self.count_head()

    def count_head(self) -> None:
        """Count the records skipped before the first pending document, once."""
        if self.pending and not self.head_counted:
            for reason, count in self.pending[0].skipped.items():
                self.skipped[reason] = self.skipped.get(reason, 0) + count
            self.head_counted = True


def shuffled(docs: Iterator[TokenDoc], window: int, seed: int, source: int, start: Cursor
             ) -> Iterator[TokenDoc]:
    """Documents shuffled within consecutive windows of `window` documents, each by its
    own seeded permutation. `docs` must start at `start`'s window; its first `start.skip`
    shuffled documents are skipped. Every document carries the cursor that restarts the
    stream right at it, so a resumed run re-reads one window at most. The records skipped
    within a window go with its first shuffled document: a resumed stream re-reads the
    window from its first document on, so it sees them only when none was consumed."""
    index, skip = start.window, start.skip
    try:
        while batch := list(islice(docs, window)):
            first = batch[0]
            order = np.random.default_rng([seed, source, index, 1]).permutation(len(batch))
            window_skipped: dict[str, int] = {}
            for doc in batch:
                for reason, count in doc.skipped.items():
                    window_skipped[reason] = window_skipped.get(reason, 0) + count
                doc.skipped = {}
            batch[order[0]].skipped = window_skipped
            for rank, position in enumerate(order[skip:], start=skip):
                doc = batch[position]
                doc.resume = Cursor(first.epoch, first.file, first.doc, window=index, skip=rank)
                yield doc
            index, skip = index + 1, 0
    finally:
        docs.close()
