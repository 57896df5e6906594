"""Ring attention: exact softmax attention over a sequence split across the ranks of a
context-parallel group, in plain PyTorch and `torch.distributed` (so on gloo too).

Each rank holds the queries, keys and values of its own tokens. The key/value blocks go
round the ring: at each of the `cp` steps a rank attends its queries to the block it
holds, merges that partial result into its running one by their log-sum-exp, and passes
the block on while it computes. The backward pass goes round again with each block's
key/value gradients travelling beside it, so that after the last pass they arrive at
the rank that owns the block; each rank's query gradient stays at home. Probabilities
are recomputed from the final log-sum-exp (flash attention's backward), so nothing of
size tokens x tokens is kept between the passes.

Two ways to know what a query sees:
- Causal over whole sequences held head-and-tail (`shard_indices`: rank i holds chunks
  i and 2cp-1-i of 2cp, so every rank has as much causal work): a block is then, by
  where it comes from, causal (the rank's own), wholly visible to the rank's queries
  in its first half (an earlier rank's), or wholly visible from the second half of the
  rank's queries (a later rank's): Megatron's three cases, no mask drawn.
- Packed samples (documents): each token's global position and sample id travel with
  the block, and a key is visible when it is at or before the query, in its sample.

Each block is computed by `block_forward` and `block_backward`: on CPU by its flash
kernel (tiles only, no score block), elsewhere in float32 from the block's scores.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

Mask = torch.Tensor | str | None  # a (batch, 1, queries, keys) bool mask, "causal", or None


def shard_indices(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The sequence positions context-parallel rank `rank` holds: of 2*cp equal chunks,
    chunk `rank` and chunk 2*cp-1-rank (Megatron's and torchtitan's load balance: every
    rank has as many early as late tokens, so the causal work is even)."""
    if seq_len % (2 * cp):
        raise ValueError(f"a sequence of {seq_len} tokens does not split into 2 x {cp} "
                         "equal chunks")
    chunk = seq_len // (2 * cp)
    head = torch.arange(rank * chunk, (rank + 1) * chunk)
    tail = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([head, tail])


def causal_block(rank: int, source: int, tokens: int) -> tuple[slice, slice, Mask]:
    """Which of this rank's queries see which keys of the block from rank `source`, both
    held head-and-tail: (queries, keys, mask)."""
    half = tokens // 2
    if source == rank:
        return slice(None), slice(None), "causal"  # head before tail: causal as they lie
    if source < rank:
        return slice(None), slice(0, half), None  # its head chunk precedes all of ours
    return slice(half, None), slice(None), None  # only our tail follows its chunks


def document_mask(query_positions: torch.Tensor, key_positions: torch.Tensor,
                  query_documents: torch.Tensor, key_documents: torch.Tensor
                  ) -> torch.Tensor:
    """(batch, 1, queries, keys) bool: keys at or before each query, of its document."""
    return (key_positions[:, None, None, :] <= query_positions[:, None, :, None]) \
        & (key_documents[:, None, None, :] == query_documents[:, None, :, None])


def expanded(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Key or value heads repeated for the query heads that share them."""
    return kv.repeat_interleave(heads // kv.shape[1], dim=1)


def grouped_sum(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of repeated key/value heads, summed back onto each head."""
    batch, heads, keys, dim = grad.shape
    return grad.view(batch, kv_heads, heads // kv_heads, keys, dim).sum(dim=2)


def flash_on(device: torch.device) -> bool:
    """Whether blocks run on the device's flash kernel: the CPU's, which takes any mask
    and returns the log-sum-exp. On CUDA the blocks are computed from their scores until
    a GPU can test the CUDA kernels' (docs/parallelism.md)."""
    return device.type == "cpu"


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) in float32 of q over one block of k, v (as many heads as q);
    a query that sees no key of the block gets a zero output and a log-sum-exp of -inf."""
    if flash_on(q.device):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, isinstance(mask, str), attn_mask=additive(mask, q.dtype))
        if isinstance(mask, torch.Tensor):  # the kernel gives a hidden row's lse as 0
            lse = lse.masked_fill(~mask.any(dim=-1), float("-inf"))
        return out.float(), lse
    s = scores(q, k, mask)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    return torch.matmul(p, v.float()), lse


def block_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, mask: Mask
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k, v (as many heads as q) from one block, given the final
    output and log-sum-exp of these queries over every block."""
    if flash_on(q.device):
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.to(q.dtype), q, k, v, out.to(q.dtype), lse, 0.0, isinstance(mask, str),
            attn_mask=additive(mask, q.dtype))
        return tuple(grad.float() for grad in grads)
    grad_out = grad_out.float()
    p = torch.exp(scores(q, k, mask) - lse[..., None])
    delta = (grad_out * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
    grad_scores = p * (torch.matmul(grad_out, v.float().transpose(-1, -2)) - delta)
    scale = 1 / math.sqrt(q.shape[-1])
    return (torch.matmul(grad_scores, k.float()) * scale,
            torch.matmul(grad_scores.transpose(-1, -2), q.float()) * scale,
            torch.matmul(p.transpose(-1, -2), grad_out))


def additive(mask: Mask, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask as the flash kernel takes it: 0 where visible, -inf where hidden."""
    if not isinstance(mask, torch.Tensor):
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf"))


def scores(q: torch.Tensor, k: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Scaled q k^T in float32, -inf where the mask hides a key."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if isinstance(mask, str):  # causal
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def merged(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
           block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions of the same queries over disjoint keys, as one."""
    total = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    return (out * torch.exp(lse - safe)[..., None]
            + block_out * torch.exp(block_lse - safe)[..., None]), total


class Ring:
    """Passing tensors to the next rank of a group while receiving the previous rank's."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.previous = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, tensors: list[torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
        """Sends `tensors` on and receives as many from behind; (requests, received)."""
        received = [torch.empty_like(t, memory_format=torch.contiguous_format)
                    for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.previous, self.group) for r in received]
        return dist.batch_isend_irecv(ops), received

    def block_mask(self, step: int, tokens: int, block: list[torch.Tensor],
                   positions: torch.Tensor | None, documents: torch.Tensor | None
                   ) -> tuple[slice, slice, Mask]:
        """What this rank's queries see of the block it holds at `step`: (queries,
        keys, mask). The block is [k, v] or, with documents, [k, v, positions, ids]."""
        if documents is None:
            return causal_block(self.rank, (self.rank - step) % self.size, tokens)
        return slice(None), slice(None), document_mask(positions, block[2], documents,
                                                       block[3])


def wait(requests: list) -> None:
    for request in requests:
        request.wait()


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, positions, documents, group):
        ring, heads = Ring(group), q.shape[1]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        block = [k, v] + ([] if documents is None else [positions, documents])
        for step in range(ring.size):
            requests, incoming = ring.start(block) if step < ring.size - 1 else ([], [])
            queries, keys, mask = ring.block_mask(step, q.shape[2], block, positions,
                                                  documents)
            part = block_forward(q[:, :, queries], expanded(block[0][:, :, keys], heads),
                                 expanded(block[1][:, :, keys], heads), mask)
            out[:, :, queries], lse[:, :, queries] = merged(
                out[:, :, queries], lse[:, :, queries], *part)
            wait(requests)
            block = incoming or block
        ctx.save_for_backward(q, k, v, out, lse,
                              *([] if documents is None else [positions, documents]))
        ctx.group = group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *placed = ctx.saved_tensors
        positions, documents = placed if placed else (None, None)
        ring, heads, kv_heads = Ring(ctx.group), q.shape[1], k.shape[1]
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        block = [k, v] + ([] if documents is None else [positions, documents])
        grad_kv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                   torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        for step in range(ring.size):
            queries, keys, mask = ring.block_mask(step, q.shape[2], block, positions,
                                                  documents)
            dq, dk, dv = block_backward(
                grad_out[:, :, queries], q[:, :, queries],
                expanded(block[0][:, :, keys], heads), expanded(block[1][:, :, keys], heads),
                out[:, :, queries], lse[:, :, queries], mask)
            grad_q[:, :, queries] += dq
            grad_kv[0][:, :, keys] += grouped_sum(dk, kv_heads)
            grad_kv[1][:, :, keys] += grouped_sum(dv, kv_heads)
            # the block and its gradients move on; after the last pass they are home
            requests, incoming = ring.start(block + grad_kv)
            wait(requests)
            block, grad_kv = incoming[:len(block)], incoming[len(block):]
        return (grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype),
                None, None, None)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   group: dist.ProcessGroup, positions: torch.Tensor | None = None,
                   documents: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of this rank's queries q (batch, heads, tokens, head_dim)
    over the keys and values k, v (batch, kv_heads, tokens, head_dim) of every rank of
    `group`. Without `documents` the tokens are this rank's `shard_indices` of whole
    sequences; with them, `positions` (batch, tokens) is each token's place in its
    sequence and `documents` (batch, tokens) its packed sample."""
    return RingAttention.apply(q, k, v, positions, documents, group)
