"""Ring attention on gloo against one process's attention over the whole sequence: the
outputs and the gradients of q, k and v, for 2 and 4 context-parallel ranks, grouped
queries, causal and packed-sample (document) masks, head-and-tail sharding, with each
block kernel."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raytron.model.ring_attention import ring_attention, shard_indices

from gloo import run_on_gloo

BATCH, HEADS, KV_HEADS, SEQ, DIM = 2, 4, 2, 16, 8


def whole(documents: bool) -> dict[str, torch.Tensor]:
    """The whole sequence's q, k, v, a weight for the loss, and each token's document."""
    generator = torch.Generator().manual_seed(3)
    tensors = {name: torch.randn(BATCH, heads, SEQ, DIM, generator=generator)
               for name, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS),
                                   ("weight", HEADS))}
    starts = torch.zeros(BATCH, SEQ, dtype=torch.long)
    if documents:  # samples of 5, 4 and 7 tokens; then 9 and 7
        starts[0, [0, 5, 9]] = 1
        starts[1, [0, 9]] = 1
    else:
        starts[:, 0] = 1
    tensors["documents"] = starts.cumsum(dim=1)
    return tensors


def reference(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain SDPA over the whole sequence: output and gradients."""
    q, k, v = (tensors[n].clone().requires_grad_() for n in ("q", "k", "v"))
    ids = tensors["documents"]
    position = torch.arange(SEQ)
    mask = (position[None, :, None] >= position[None, None, :]) \
        & (ids[:, :, None] == ids[:, None, :])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    (out * tensors["weight"]).sum().backward()
    return {"out": out.detach(), "q": q.grad, "k": k.grad, "v": v.grad}


def on_rank(documents: bool, flash: bool) -> bool:
    from raytron.model import ring_attention as ring

    ring.flash_on = lambda device: flash  # the CPU's flash kernel, or the scores' math
    cp, rank = dist.get_world_size(), dist.get_rank()
    tensors, expected = whole(documents), reference(whole(documents))
    mine = shard_indices(SEQ, cp, rank)
    q, k, v = (tensors[n][:, :, mine].clone().requires_grad_() for n in ("q", "k", "v"))
    positions = mine.expand(BATCH, -1)
    ids = tensors["documents"][:, mine] if documents else None
    out = ring_attention(q, k, v, dist.group.WORLD, positions, ids)
    (out * tensors["weight"][:, :, mine]).sum().backward()
    for name, got in (("out", out), ("q", q.grad), ("k", k.grad), ("v", v.grad)):
        # atol: float32 sums in another order; a near-zero gradient came out 1.3e-6 off
        # on an AMD EPYC; the machines before it had stayed within 1e-6
        torch.testing.assert_close(got, expected[name][:, :, mine], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name} on rank {rank}: {m}")
    return True


@pytest.mark.parametrize(("cp", "flash"), [(4, True), (2, False)],
                         ids=["cp4-flash", "cp2-scores"])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
def test_ring_attention_equals_attention_over_the_whole_sequence(cp, flash, documents):
    """Either block kernel: the CPU's flash kernel, or the float32 scores used elsewhere."""
    assert run_on_gloo(cp, on_rank, documents, flash)


def test_head_and_tail_shards_cover_the_sequence_once_with_even_causal_work():
    shards = [shard_indices(16, 4, rank) for rank in range(4)]
    assert sorted(torch.cat(shards).tolist()) == list(range(16))
    assert {int(shard.sum()) for shard in shards} == {30}  # as many early as late tokens
    with pytest.raises(ValueError, match="2 x 4 equal chunks"):
        shard_indices(12, 4, 0)
