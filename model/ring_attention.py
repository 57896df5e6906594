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

What a query sees is described by global positions (and document ids for packed
samples): a key is visible when it is at or before the query, in the same document.
So any sharding of the sequence works, and the head-and-tail one (`shard_indices`) gives
each rank the same causal work.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


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


def visible(query_positions: torch.Tensor, key_positions: torch.Tensor,
            query_documents: torch.Tensor | None, key_documents: torch.Tensor | None
            ) -> torch.Tensor:
    """(batch, 1, queries, keys) bool: keys at or before each query, of its document."""
    seen = key_positions[:, None, None, :] <= query_positions[:, None, :, None]
    if query_documents is not None:
        seen = seen & (key_documents[:, None, None, :] == query_documents[:, None, :, None])
    return seen


def scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled q k^T in float32, -inf where the mask hides a key; k's heads repeated for
    grouped queries."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask, float("-inf"))


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of q over one key/value block, in float32; a query that sees
    no key of the block gets a zero output and a log-sum-exp of -inf."""
    s = scores(q, k, mask)
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - finite[..., None])
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.matmul(p, v.float()), lse


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
        self.size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % self.size)
        self.previous = dist.get_global_rank(group, (rank - 1) % self.size)

    def start(self, tensors: list[torch.Tensor]) -> tuple[list, list[torch.Tensor]]:
        """Sends `tensors` on and receives as many from behind; (requests, received)."""
        received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.previous, self.group) for r in received]
        return dist.batch_isend_irecv(ops), received


def wait(requests: list) -> None:
    for request in requests:
        request.wait()


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, query_positions, key_positions, query_documents,
                key_documents, group):
        ring = Ring(group)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        block = [k, v, key_positions] + ([] if key_documents is None else [key_documents])
        for step in range(ring.size):
            requests, incoming = ring.start(block) if step < ring.size - 1 else ([], [])
            mask = visible(query_positions, block[2], query_documents,
                           block[3] if key_documents is not None else None)
            out, lse = merged(out, lse, *block_attention(q, block[0], block[1], mask))
            wait(requests)
            block = incoming or block
        ctx.save_for_backward(q, k, v, out, lse, query_positions, key_positions,
                              *([] if query_documents is None
                                else [query_documents, key_documents]))
        ctx.group = group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, query_positions, key_positions, *documents = ctx.saved_tensors
        query_documents, key_documents = documents if documents else (None, None)
        ring = Ring(ctx.group)
        grad_out = grad_out.float()
        delta = (grad_out * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        block = [k, v, key_positions] + ([] if key_documents is None else [key_documents])
        grad_kv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                   torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        groups, scale = q.shape[1] // k.shape[1], 1 / math.sqrt(q.shape[-1])
        for _ in range(ring.size):
            block_k, block_v = block[0], block[1]
            mask = visible(query_positions, block[2], query_documents,
                           block[3] if key_documents is not None else None)
            p = torch.exp(scores(q, block_k, mask) - lse[..., None])
            expanded_v = block_v.float().repeat_interleave(groups, dim=1)
            expanded_k = block_k.float().repeat_interleave(groups, dim=1)
            grad_scores = p * (torch.matmul(grad_out, expanded_v.transpose(-1, -2)) - delta)
            grad_q += torch.matmul(grad_scores, expanded_k) * scale
            grad_kv[0] = grad_kv[0] + grouped_sum(
                torch.matmul(grad_scores.transpose(-1, -2), q.float()) * scale, groups)
            grad_kv[1] = grad_kv[1] + grouped_sum(
                torch.matmul(p.transpose(-1, -2), grad_out), groups)
            # the block and its gradients move on; after the last pass they are home
            requests, incoming = ring.start(block + grad_kv)
            wait(requests)
            block, grad_kv = incoming[:len(block)], incoming[len(block):]
        return (grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype),
                None, None, None, None, None)


def grouped_sum(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of repeated key/value heads, summed back onto each head."""
    batch, heads, keys, dim = grad.shape
    return grad.view(batch, heads // groups, groups, keys, dim).sum(dim=2)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   query_positions: torch.Tensor, key_positions: torch.Tensor,
                   group: dist.ProcessGroup, query_documents: torch.Tensor | None = None,
                   key_documents: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of this rank's queries q (batch, heads, queries, head_dim)
    over the keys and values k, v (batch, kv_heads, keys, head_dim) of every rank of
    `group`; positions (batch, tokens) are each token's place in the whole sequence and
    documents (batch, tokens), when given, its packed sample."""
    return RingAttention.apply(q, k, v, query_positions, key_positions, query_documents,
                               key_documents, group)
