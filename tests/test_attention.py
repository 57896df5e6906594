"""The attention function's kernels against SDPA's math kernel with a dense mask drawn by
hand: FlexAttention (CUDA's masked path, run here compiled and without gradients, as
CPU allows), SDPA with a bool mask (CPU's masked path), forward and backward; which
kernel each mask and device get; masks in compiled, recomputed blocks."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import raytron.model.attention as attention_module
from raytron.model.attention import (
    CAUSAL,
    CachedQueries,
    Documents,
    Kernel,
    attention,
    choose_kernel,
    flex,
)
from raytron.model.gpt import GPT, GPTShape
from raytron.model.kv_cache import KVCache
from raytron.model.parallelize import apply_activation_checkpointing, apply_compile

SAMPLES = [[5, 70, 200, 25], [150, 150], [1, 299]]  # per row; blocks of 128 cut samples
SEQ = 300


def qkv(batch: int, queries: int, keys: int, heads: int = 8, kv_heads: int = 2,
        grad: bool = False) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(batch, heads, queries, 16), (batch, kv_heads, keys, 16),
              (batch, kv_heads, keys, 16)]
    return tuple(torch.randn(s, generator=generator).requires_grad_(grad) for s in shapes)


def positions() -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in SAMPLES])


def drawn_document_mask() -> torch.Tensor:
    """(rows, 1, seq, seq): block-diagonal causal, one block per sample."""
    mask = torch.zeros(len(SAMPLES), 1, SEQ, SEQ, dtype=torch.bool)
    for row, sizes in enumerate(SAMPLES):
        start = 0
        for size in sizes:
            mask[row, 0, start : start + size, start : start + size] = torch.ones(
                size, size, dtype=torch.bool).tril()
            start += size
    return mask


def math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         is_causal: bool = False) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=q.shape[1] != k.shape[1])


def test_flex_equals_math_with_document_masks_and_grouped_heads():
    q, k, v = qkv(len(SAMPLES), SEQ, SEQ)
    with torch.no_grad():
        got = flex(q, k, v, Documents.of_positions(positions()))
    torch.testing.assert_close(got, math(q, k, v, drawn_document_mask()), rtol=1e-5, atol=1e-5)


def test_flex_equals_math_over_cached_prompts_of_different_lengths():
    """Three sequences holding 0, 3 and 9 tokens take 6 more (a prefill), then one (a
    decode step); each sees its own keys up to itself, of a cache 16 long."""
    lengths = torch.tensor([0, 3, 9])
    for new in (6, 1):
        query_positions = lengths[:, None] + torch.arange(new)
        q, k, v = qkv(3, new, 16)
        drawn = torch.zeros(3, 1, new, 16, dtype=torch.bool)
        for row in range(3):
            for query, position in enumerate(query_positions[row].tolist()):
                drawn[row, 0, query, : position + 1] = True
        with torch.no_grad():
            got = flex(q, k, v, CachedQueries(query_positions, 16))
        torch.testing.assert_close(got, math(q, k, v, drawn), rtol=1e-5, atol=1e-5)
        lengths = lengths + new


def test_masked_sdpa_on_cpu_equals_math_forward_and_backward():
    q, k, v = qkv(len(SAMPLES), SEQ, SEQ, grad=True)
    mask = Documents.of_positions(positions())
    assert choose_kernel(mask, "cpu") is Kernel.SDPA
    got = attention(q, k, v, mask)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want = math(q, k, v, drawn_document_mask())
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad, want_grad in zip("qkv", grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("queries", [40, 1], ids=["causal", "decode-step"])
def test_unmasked_attention_equals_math(queries):
    """Causal (pre-training, a prefill from an empty cache), or no mask at all (a decode
    step at equal lengths: one query that sees every key)."""
    q, k, v = qkv(2, queries, 40)
    mask = CAUSAL if queries == 40 else None
    torch.testing.assert_close(attention(q, k, v, mask),
                               math(q, k, v, None, is_causal=mask is CAUSAL),
                               rtol=1e-5, atol=1e-5)


def test_the_kernel_for_each_mask_and_device():
    documents = Documents.of_positions(positions())
    cached = CachedQueries(torch.tensor([[4], [9]]), 10)
    for masked in (documents, cached):
        assert choose_kernel(masked, "cuda") is Kernel.FLEX
        assert choose_kernel(masked, "cpu") is Kernel.SDPA
    for unmasked in (CAUSAL, None):  # None: a decode step at equal lengths sees every key
        assert choose_kernel(unmasked, "cuda") is Kernel.SDPA
        assert choose_kernel(unmasked, "cpu") is Kernel.SDPA


def small_gpt(**changes) -> GPT:
    base = dict(n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, ffn_hidden=96,
                vocab_size=101, max_seq_len=32, init_std=0.15)
    return GPT(GPTShape(**{**base, **changes}), seed=3).eval()


def cached_logits(gpt: GPT) -> list[torch.Tensor]:
    """Prompts of 7 and 3 tokens (padded prefill), 4 more tokens each at their own
    positions, then a decode step."""
    cache = KVCache(2, 32, 2, 2, 8, torch.float32, torch.device("cpu"))
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = [gpt(tokens[:, :7], cache)]
        cache.set_lengths([7, 3])
        logits.append(gpt(tokens[:, 7:11], cache))
        logits.append(gpt(tokens[:, 11:], cache))
    return logits


def test_a_kv_cache_gives_the_same_logits_through_flex(monkeypatch):
    """The model with the kernel choice CUDA gets (flex for the cache's masks) against
    CPU's, pinned to the math kernel."""
    gpt = small_gpt()
    with sdpa_kernel(SDPBackend.MATH):
        want = cached_logits(gpt)
    monkeypatch.setattr(attention_module, "choose_kernel",
                        lambda mask, device_type: choose_kernel(mask, "cuda"))
    for got, expected in zip(cached_logits(gpt), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_compiled_recomputed_block_takes_a_document_mask():
    """The mask is built before the layers: a compiled block under selective
    recomputation may not build and keep it (dynamo rejects the side effect)."""
    eager, compiled = small_gpt().train(), small_gpt().train()
    apply_activation_checkpointing(compiled, 1, selective=True)
    apply_compile(compiled)
    tokens = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(2))
    packed = torch.cat([torch.arange(12), torch.arange(20)]).repeat(2, 1)
    for gpt in (eager, compiled):
        gpt(tokens, positions=packed).square().mean().backward()
    for (name, got), want in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)
