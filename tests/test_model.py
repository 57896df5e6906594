"""The GPT itself: shapes, causality, grouped-query attention, tying, counts."""

import pytest
import torch
import torch.nn.functional as F

from raytron.model.gpt import GPT, IGNORE, GPTShape, cross_entropy
from raytron.model.spec import llama_ffn_hidden


def shape(**changes) -> GPTShape:
    base = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, ffn_hidden=64,
                vocab_size=97, max_seq_len=16)
    return GPTShape(**{**base, **changes})


def model(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(shape(**changes))


def test_logits_shape_and_finite_loss():
    gpt = model()
    tokens = torch.randint(0, 97, (3, 16))
    logits = gpt(tokens)
    assert logits.shape == (3, 16, 97)
    loss = cross_entropy(logits[:, :-1], tokens[:, 1:])
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_future_tokens_change_nothing():
    gpt = model()
    tokens = torch.randint(0, 97, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = torch.randint(0, 97, (2, 6))
    before, after = gpt(tokens), gpt(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_grouped_query_attention_equals_heads_sharing_keys_and_values():
    """GQA with 2 KV heads == multi-head attention whose K/V heads are repeated copies."""
    gqa = model(n_kv_heads=2)
    mha = model(n_kv_heads=4)
    state = gqa.state_dict()
    head_dim = 32 // 4
    for name, weight in state.items():
        if name.endswith(("wk.weight", "wv.weight")):
            heads = weight.view(2, head_dim, 32)
            state[name] = heads.repeat_interleave(2, dim=0).reshape(4 * head_dim, 32)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)
    assert gqa.layers["0"].attention.wk.weight.shape == (2 * head_dim, 32)


def test_tied_output_shares_the_embedding():
    tied, untied = model(tie_embeddings=True), model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_parameter_count_by_hand():
    # per layer: q,o 32x32 each; k,v 32x32 each (4 KV heads); 3 MLP mats 32x64; 2 norms of 32
    per_layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32
    expected = 97 * 32 + 2 * per_layer + 32  # tied embedding/head + layers + final norm
    assert model().num_params() == expected


def test_flops_per_token_by_hand():
    seq = 16
    matmuls = 2 * (4 * 32 * 32 + 3 * 32 * 64) + 97 * 32  # the (tied) head is a matmul too
    expected = 6 * matmuls + 12 * 2 * 32 * seq
    assert model().flops_per_token(seq) == expected


@pytest.mark.parametrize(("d_model", "expected"), [(4096, 11008), (128, 384), (2048, 5632)])
def test_llama_mlp_width(d_model, expected):
    assert llama_ffn_hidden(d_model, 256 if d_model > 128 else 64) == expected


def test_packed_samples_with_positions_equal_each_sample_run_alone():
    """Document masking: a sample packed after another sees nothing of it and starts its
    rotary positions at 0, so its logits are those of the sample on its own."""
    gpt = model(n_kv_heads=2)
    first, second = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None]
    logits = gpt(packed, positions=positions)
    torch.testing.assert_close(logits[:, :6], gpt(first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 6:], gpt(second), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gpt(packed)[:, 6:], gpt(second), atol=1e-3)


def test_the_loss_skips_tokens_that_are_not_learned():
    logits = torch.randn(1, 4, 97)
    labels = torch.tensor([[5, IGNORE, 7, IGNORE]])
    by_hand = -(logits[0, 0].log_softmax(-1)[5] + logits[0, 2].log_softmax(-1)[7])
    torch.testing.assert_close(cross_entropy(logits, labels, reduction="sum"), by_hand)
    torch.testing.assert_close(cross_entropy(logits, labels), by_hand / 2)


def test_the_chunked_loss_equals_the_whole_one_and_keeps_no_logits():
    """Values and gradients of each row's loss, chunk by chunk (chunks that split rows,
    a short last one) or all at once; what autograd keeps for the backward pass: the
    whole logits (22 MB here) against the hidden states and labels of the chunks."""
    from torch import nn

    from raytron.model.gpt import row_losses

    def kept_bytes(hidden, chunk):
        storages = {}

        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return row_losses(hidden, head, labels, chunk), sum(storages.values())

    torch.manual_seed(0)
    head = nn.Linear(64, 5000, bias=False)
    labels = torch.randint(0, 5000, (2, 512))
    labels[0, :10] = IGNORE
    runs = []
    for chunk in (None, 300):
        hidden = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(1),
                             requires_grad=True)
        head.zero_grad()
        losses, kept = kept_bytes(hidden, chunk)
        (losses * torch.tensor([1.0, 2.0])).sum().backward()
        runs.append((losses.detach(), hidden.grad, head.weight.grad.clone(), kept))
    (whole, *whole_grads, whole_kept), (chunked, *chunked_grads, chunked_kept) = runs
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    for got, want in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max())
    assert whole_kept > 2 * 512 * 5000 * 4 > 50 * chunked_kept
    by_hand = F.cross_entropy(head(torch.randn(2, 512, 64, generator=torch.Generator()
                                               .manual_seed(1))).flatten(0, 1),
                              labels.flatten(), ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(whole, by_hand.view(2, 512).sum(1).detach())
