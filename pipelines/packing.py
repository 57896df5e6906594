"""Packing documents into fixed-length training sequences, with a cursor to resume from.

Documents are concatenated with EOS after each and cut into sequences of `seq_len + 1`
tokens; consecutive sequences share one boundary token (Megatron's GPT dataset), so
every token is a target exactly once. The cursor names the first token of the next
sequence by where it comes from (epoch, file, record, offset), not by a count, so
resuming reads from that file on without re-reading what came before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    file: int = 0  # position of the file in the epoch's file order
    doc: int = 0  # record index within that file
    offset: int = 0  # tokens of that document (EOS included) already consumed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenDoc:
    epoch: int
    file: int
    doc: int
    tokens: np.ndarray  # the document's ids followed by EOS


class Packer:
    """Cuts a document stream into sequences of `seq_len + 1` tokens."""

    def __init__(self, docs: Iterator[TokenDoc], seq_len: int, first_offset: int = 0):
        self.docs = docs
        self.seq_len = seq_len
        self.pending: deque[TokenDoc] = deque()
        self.offset = first_offset  # consumed tokens of pending[0]

    def cursor(self) -> Cursor:
        """Where the next sequence starts."""
        self.fill(1)
        head = self.pending[0]
        return Cursor(head.epoch, head.file, head.doc, self.offset)

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

    def advance(self, tokens: int) -> None:
        while tokens:
            rest = len(self.pending[0].tokens) - self.offset
            if tokens < rest:
                self.offset += tokens
                return
            tokens -= rest
            self.pending.popleft()
            self.offset = 0
