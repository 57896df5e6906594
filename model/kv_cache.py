"""The keys and values of every token a model has seen, kept so that generating a token
costs one position of compute instead of the whole sequence again.

Buffers are allocated once per generation, (batch, kv_heads, max_len, head_dim) per
layer, as in Meta's reference Llama. Each sequence of the batch has its own length, so
prompts of different lengths decode together: a forward writes each sequence's new
keys at that sequence's next positions and attends only over its own earlier ones.
"""

from __future__ import annotations

import torch

from raytron.model.attention import CAUSAL, CachedQueries, Mask


class LayerCache:
    """One layer's buffers; `KVCache.advance` sets where the next keys go."""

    def __init__(self, owner: KVCache, keys: torch.Tensor, values: torch.Tensor):
        self.owner, self.keys, self.values = owner, keys, values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, kv_heads, new, head_dim) at the new positions; return the
        keys and values of every position up to the furthest one written."""
        start, span = self.owner.start, self.owner.span
        if start is not None:  # every sequence at the same positions: a plain copy
            self.keys[:, :, start:span] = k
            self.values[:, :, start:span] = v
        else:
            index = self.owner.positions[:, None, :, None].expand_as(k)
            self.keys.scatter_(2, index, k.to(self.keys.dtype))
            self.values.scatter_(2, index, v.to(self.values.dtype))
        return self.keys[:, :, :span], self.values[:, :, :span]

    @property
    def mask(self) -> Mask:
        return self.owner.mask

    def keep(self, rows: torch.Tensor) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]


class KVCache:
    def __init__(self, batch: int, max_len: int, n_layers: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.hold([(torch.zeros(shape, dtype=dtype, device=device),
                    torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)],
                  [0] * batch)

    @classmethod
    def over(cls, buffers: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]
             ) -> KVCache:
        """A cache on buffers it does not own, (keys, values) per layer, each (batch,
        kv_heads, max_len, head_dim), holding `lengths` tokens per sequence: the serving
        engine's view of some of its slots for one forward."""
        cache = cls.__new__(cls)
        cache.hold(buffers, lengths)
        return cache

    def hold(self, buffers: list[tuple[torch.Tensor, torch.Tensor]], lengths: list[int]
             ) -> None:
        keys = buffers[0][0]
        self.max_len = keys.shape[2]
        self.lengths = list(lengths)  # tokens cached per sequence
        self.positions = torch.zeros(len(lengths), 0, dtype=torch.long, device=keys.device)
        self.span = 0
        self.start: int | None = None  # the first new position, when all sequences share it
        self.mask: Mask = None  # which cached keys the new tokens see
        self.layers = [LayerCache(self, k, v) for k, v in buffers]

    def advance(self, new: int, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for `new` tokens of every sequence, at its next positions; returns
        the rotary tables of those positions, broadcastable to (batch, heads, new,
        head_dim / 2)."""
        end = max(self.lengths) + new
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {end} are needed")
        device = self.positions.device
        self.span = end
        self.start = self.lengths[0] if len(set(self.lengths)) == 1 else None
        if self.start is not None and new == 1:
            self.mask = None  # one new token each, at the same position: it sees them all
            self.lengths = [end] * len(self.lengths)
            return cos[self.start : end], sin[self.start : end]
        starts = torch.tensor(self.lengths, device=device)
        self.positions = starts[:, None] + torch.arange(new, device=device)
        # each query sees its position and before: from an empty cache, plain causal
        self.mask = CAUSAL if self.start == 0 else CachedQueries(self.positions, end)
        self.lengths = [length + new for length in self.lengths]
        return cos[self.positions].unsqueeze(1), sin[self.positions].unsqueeze(1)

    def set_lengths(self, lengths: list[int]) -> None:
        """After a padded prefill: each sequence's real length, so that its next token
        overwrites the padding's keys."""
        self.lengths = list(lengths)

    def keep(self, rows: list[int]) -> None:
        """Only these sequences go on (the others have finished)."""
        index = torch.tensor(rows, device=self.positions.device)
        for layer in self.layers:
            layer.keep(index)
        self.lengths = [self.lengths[row] for row in rows]
