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
    targets: np.ndarray | None = None  # fine-tuning samples: which tokens are learned
    resume: Cursor | None = None  # where a stream restarts to yield this document first
    skipped: dict[str, int] = field(default_factory=dict)  # records skipped just before it
    chosen_length: int | None = None  # a preference pair: its chosen sequence's tokens,
    # which the rejected one's follow in `tokens` (and `targets`)

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
            add_counts(self.skipped, self.pending[0].skipped)
            self.head_counted = True


TOO_LONG = "too_long"  # a sample longer than a sequence, dropped (data.overlong=drop)


@dataclass
class Packed:
    """One sequence of whole samples: its tokens, which of them are learned (each from
    the token before it), and each token's position within its own sample."""

    tokens: np.ndarray
    targets: np.ndarray
    positions: np.ndarray


class SamplePacker:
    """Whole samples into sequences of `seq_len + 1` tokens, for fine-tuning: a sample is
    never split between sequences (its answer would lose its prompt), the rest of a
    sequence is padding that is never learned, and the first token of a sample is never
    learned from the sample before it. A longer sample is dropped and counted as
    `too_long`, or with `truncate` cut to the sequence. Skipped records are counted as
    `Packer` counts them: a resumed packer has counted those before its first sample."""

    def __init__(self, docs: Iterator[TokenDoc], seq_len: int, pad: int, truncate: bool = False,
                 skipped: dict[str, int] | None = None, resumed: bool = False):
        self.docs = docs
        self.length = seq_len + 1
        self.pad = pad
        self.truncate = truncate
        self.pending: TokenDoc | None = None  # read, not yet packed
        self.skipped = dict(skipped or {})
        self.counted = resumed  # the next document's skipped records are in `skipped`

    def cursor(self) -> Cursor:
        """Where the next sequence starts: its first sample."""
        return self.peek().position()

    def peek(self) -> TokenDoc:
        while self.pending is None:
            doc = next(self.docs)  # StopIteration ends the packer
            if not self.counted:
                add_counts(self.skipped, doc.skipped)
            self.counted = False
            if self.too_long(doc) and not self.truncate:
                add_counts(self.skipped, {TOO_LONG: 1})
                continue
            self.pending = doc
        return self.pending

    def too_long(self, doc: TokenDoc) -> bool:
        return len(doc.tokens) > self.length

    def next_sequence(self) -> Packed:
        tokens, targets, positions, used = [], [], [], 0
        while used < self.length:
            try:
                doc = self.peek()
            except StopIteration:
                if used:
                    break
                raise
            size = min(len(doc.tokens), self.length)
            if used + size > self.length:
                break
            learned = np.ones(size, bool) if doc.targets is None else doc.targets[:size].copy()
            learned[0] = False
            tokens.append(doc.tokens[:size])
            targets.append(learned)
            positions.append(np.arange(size))
            used += size
            self.pending = None
        padding = self.length - used
        tokens.append(np.full(padding, self.pad))
        targets.append(np.zeros(padding, bool))
        positions.append(np.arange(padding))
        return Packed(np.concatenate(tokens).astype(np.int32), np.concatenate(targets),
                      np.concatenate(positions).astype(np.int32))


class PairPacker(SamplePacker):
    """Preference pairs, one to two rows: its chosen sequence padded, then its rejected
    one (TRL's DPO batches, unpacked), so that a pair is never split between ranks or
    micro-batches when rows are cut in even numbers. A pair with a sequence longer than a
    row is dropped as `too_long`, or with `truncate` each cut to the row."""

    def too_long(self, doc: TokenDoc) -> bool:
        return max(doc.chosen_length, len(doc.tokens) - doc.chosen_length) > self.length

    def next_sequence(self) -> Packed:
        """Both rows of the next pair, as one `Packed` of (2, seq_len + 1) arrays."""
        doc = self.peek()
        self.pending = None
        rows = []
        for part in (slice(0, doc.chosen_length), slice(doc.chosen_length, None)):
            tokens, learned = doc.tokens[part][: self.length], doc.targets[part][: self.length]
            padding = self.length - len(tokens)
            rows.append(Packed(
                np.concatenate([tokens, np.full(padding, self.pad)]).astype(np.int32),
                np.concatenate([learned, np.zeros(padding, bool)]),
                np.concatenate([np.arange(len(tokens)), np.arange(padding)]).astype(np.int32)))
        return Packed(*(np.stack([getattr(row, name) for row in rows])
                        for name in ("tokens", "targets", "positions")))


def add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for reason, count in counts.items():
        total[reason] = total.get(reason, 0) + count


@dataclass
class Batch:
    """Sequences of `seq_len + 1` tokens as the feeder hands them out. Fine-tuning adds
    which tokens are learned and, with document masking, each token's position in its
    sample; `target_count` counts the learned tokens of the whole global batch, which
    the loss divides by so that it does not depend on how the batch is split."""

    tokens: np.ndarray  # (rows, seq_len + 1)
    targets: np.ndarray | None = None  # (rows, seq_len + 1) bool; None: every token but the first
    positions: np.ndarray | None = None  # (rows, seq_len + 1); None: 0, 1, ... along the row
    target_count: int = 0

    @classmethod
    def of(cls, sequences: list, document_mask: bool = True) -> Batch:
        """The batch of `Packer` (token arrays) or `SamplePacker` (`Packed`) sequences; a
        `PairPacker`'s give two rows each."""
        if not isinstance(sequences[0], Packed):
            tokens = np.stack(sequences)
            return cls(tokens, target_count=tokens.shape[0] * (tokens.shape[1] - 1))
        targets = np.vstack([s.targets for s in sequences])
        return cls(np.vstack([s.tokens for s in sequences]), targets,
                   np.vstack([s.positions for s in sequences]) if document_mask else None,
                   int(targets[:, 1:].sum()))

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, start: int, stop: int) -> Batch:
        """Some rows; `target_count` stays the whole batch's."""
        return Batch(self.tokens[start:stop],
                     None if self.targets is None else self.targets[start:stop],
                     None if self.positions is None else self.positions[start:stop],
                     self.target_count)


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
                add_counts(window_skipped, doc.skipped)
                doc.skipped = {}
            batch[order[0]].skipped = window_skipped
            for rank, position in enumerate(order[skip:], start=skip):
                doc = batch[position]
                doc.resume = Cursor(first.epoch, first.file, first.doc, window=index, skip=rank)
                yield doc
            index, skip = index + 1, 0
    finally:
        docs.close()
