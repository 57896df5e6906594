"""Attention for training, generation and serving alike: `attention(q, k, v, mask)`.

The mask is a description (causal; causal within each sample of a packed sequence;
a KV cache's queries, each at its own position), not a drawn tensor, so that each
kernel builds what it needs. A dense (batch, 1, queries, keys) bool mask sends CUDA's
SDPA to its math kernel (flash takes no mask; memory-efficient takes no grouped
query attention), which holds a (batch, heads, queries, keys) fp32 score tensor per
layer: about 2 GB per layer and micro-batch for llama-1b at 2048 tokens.

The kernel is chosen in one place, `choose_kernel`:
- causal or no mask, any device: SDPA (`is_causal`, grouped heads as they are): flash.
- a masked description on CUDA: FlexAttention, with a block mask that skips the
  blocks no query sees and evaluates the description's predicate in the others.
- a masked description on CPU: SDPA with the dense bool mask, which the CPU's flash
  kernel takes (with grouped heads) forward and backward; FlexAttention has no
  backward on CPU (torch 2.13).
- a context shard (a sequence split over ranks), any device: ring attention
  (model/ring_attention.py), exact over the whole sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


class Kernel(Enum):
    SDPA = "scaled_dot_product_attention"
    FLEX = "flex_attention"
    RING = "ring_attention"


class Causal:
    """Each query sees itself and the keys before it (pre-training)."""


CAUSAL = Causal()


class Masked:
    """Which keys each query sees, as a predicate over (row, query, key) indices that
    FlexAttention evaluates per block and SDPA draws as a dense tensor. Made once per
    forward and shared by the layers; it builds the mask of its device's kernel when
    made, before the layers: a compiled, recomputed layer may not store it (dynamo
    rejects the side effect)."""

    dynamic = False  # whether its shapes change from call to call (flex compiles for that)

    def __init__(self, batch: int, queries: int, keys: int, device: torch.device):
        self.batch, self.queries, self.keys, self.device = batch, queries, keys, device
        self._dense: torch.Tensor | None = None
        self._block: BlockMask | None = None
        if choose_kernel(self, device.type) is Kernel.FLEX:
            self.block_mask()
        else:
            self.dense()

    def visible(self, row: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> torch.Tensor:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """(batch, 1, queries, keys) bool: SDPA's mask."""
        if self._dense is None:
            index = functools.partial(torch.arange, device=self.device)
            self._dense = self.visible(index(self.batch)[:, None, None, None],
                                       index(self.queries)[None, None, :, None],
                                       index(self.keys)[None, None, None, :])
        return self._dense

    def block_mask(self) -> BlockMask:
        """FlexAttention's mask: the same for every head."""
        if self._block is None:
            from torch.nn.attention.flex_attention import create_block_mask

            self._block = create_block_mask(
                lambda row, head, query, key: self.visible(row, query, key),
                self.batch, None, self.queries, self.keys, device=self.device)
        return self._block


class Documents(Masked):
    """Packed samples (fine-tuning): each query sees the keys of its own sample up to
    itself. `ids` (batch, seq): the sample of each token."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        super().__init__(ids.shape[0], ids.shape[1], ids.shape[1], ids.device)

    @classmethod
    def of_positions(cls, positions: torch.Tensor) -> Documents:
        return cls(cls.ids_of(positions))

    @staticmethod
    def ids_of(positions: torch.Tensor) -> torch.Tensor:
        """Each token's sample, from its position in it: a sample begins where it is 0."""
        return (positions == 0).cumsum(dim=1)

    def visible(self, row: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> torch.Tensor:
        return (query >= key) & (self.ids[row, query] == self.ids[row, key])


class CachedQueries(Masked):
    """A KV cache's new tokens, each at its own position of its own sequence: it sees
    the keys at that position and before, of the cache's first `keys`. Later keys are
    another sequence's span (prompts of different lengths) or stale padding."""

    # The keys grow by one each decode step and the batch shrinks as sequences end:
    # compiled for static shapes, flex recompiled every step, hit dynamo's limit of 8
    # and ran uncompiled; with dynamic shapes it compiled once (docs/parallelism.md).
    dynamic = True

    def __init__(self, positions: torch.Tensor, keys: int):
        self.positions = positions  # (batch, new)
        super().__init__(positions.shape[0], positions.shape[1], keys, positions.device)

    def visible(self, row: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> torch.Tensor:
        return key <= self.positions[row, query]


class ContextShard:
    """This rank's share of sequences split over a group of ranks (context parallelism):
    each token's index in its whole sequence, its packed sample's id when samples are
    masked from each other (else None), and the group holding the other shares. Causal
    over the whole sequence, within each sample."""

    def __init__(self, order: torch.Tensor, documents: torch.Tensor | None, group):
        self.order, self.documents, self.group = order, documents, group


Mask = Causal | Masked | ContextShard | None  # None: every query sees every key


def choose_kernel(mask: Mask, device_type: str) -> Kernel:
    """Ring attention for a context shard; FlexAttention for a masked description on
    CUDA, SDPA otherwise (see the module docstring for why)."""
    if isinstance(mask, ContextShard):
        return Kernel.RING
    return Kernel.FLEX if isinstance(mask, Masked) and device_type == "cuda" else Kernel.SDPA


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Softmax attention of q (batch, heads, queries, head_dim) over k, v (batch,
    kv_heads, keys, head_dim); heads share keys in groups when kv_heads < heads."""
    kernel = choose_kernel(mask, q.device.type)
    if kernel is Kernel.RING:
        from raytron.model.ring_attention import ring_attention

        return ring_attention(q, k, v, mask.group, mask.order, mask.documents)
    if kernel is Kernel.FLEX:
        return flex(q, k, v, mask)
    return sdpa(q, k, v, mask)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    grouped = q.shape[1] != k.shape[1]
    if isinstance(mask, Causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None
                                          else mask.dense(), enable_gqa=grouped)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Masked) -> torch.Tensor:
    return compiled_flex_attention(mask.dynamic)(q, k, v, block_mask=mask.block_mask(),
                                                 enable_gqa=q.shape[1] != k.shape[1])


@functools.cache
def compiled_flex_attention(dynamic: bool) -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process (uncompiled it materializes the scores),
    on first use: compiling at import would import torch._dynamo, about 2 s, into
    every process that imports the model. Without `dynamic`, dynamo's default: static
    shapes (a run's sequences all have one length), dynamic once they change."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic or None)
