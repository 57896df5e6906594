"""Hugging Face Llama <-> raytron GPT: parameter names, the RoPE permutation, config.json.

The architectures are the same but for one detail: raytron's RoPE rotates consecutive
pairs of a head's dimensions (Meta's reference), transformers' rotates its two halves.
The q and k projections' rows are therefore permuted on the way out and back on the way
in (transformers' `convert_llama_weights_to_hf.py` does the same); without it the model
loads and is subtly wrong, which is why the tests compare logits.
"""

from __future__ import annotations

from typing import Any

import torch

from raytron.model.gpt import GPTShape

# raytron name (in a layer) -> transformers name (in model.layers.<i>)
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, inner = name.split(".", 2)  # layers.<i>.<inner>
    return f"model.layers.{index}.{LAYER_NAMES[inner]}"


def raytron_name(name: str) -> str | None:
    """The raytron name of a transformers parameter; None for one raytron has no use for
    (e.g. `rotary_emb.inv_freq`, which both compute)."""
    for ours, theirs in TOP_NAMES.items():
        if name == theirs:
            return ours
    parts = name.split(".", 3)  # model.layers.<i>.<inner>
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for ours, theirs in LAYER_NAMES.items():
            if parts[3] == theirs:
                return f"layers.{parts[2]}.{ours}"
    return None


def pairs_to_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...)."""
    rows, columns = weight.shape
    return weight.view(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows,
                                                                                    columns)


def halves_to_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows, columns = weight.shape
    return weight.view(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows,
                                                                                    columns)


def rotary_heads(name: str, shape: GPTShape) -> int | None:
    """The head count to permute a q or k projection by; None for every other weight."""
    if name.endswith("attention.wq.weight"):
        return shape.n_heads
    return shape.n_kv_heads if name.endswith("attention.wk.weight") else None


def to_hf(state: dict[str, torch.Tensor], shape: GPTShape) -> dict[str, torch.Tensor]:
    """transformers' state dict of a raytron one (a tied head is left out, as transformers
    saves it)."""
    converted = {}
    for name, tensor in state.items():
        if name == "output.weight" and shape.tie_embeddings:
            continue
        heads = rotary_heads(name, shape)
        converted[hf_name(name)] = tensor if heads is None else pairs_to_halves(tensor, heads)
    return converted


def from_hf(state: dict[str, torch.Tensor], shape: GPTShape) -> dict[str, torch.Tensor]:
    converted = {}
    for name, tensor in state.items():
        ours = raytron_name(name)
        if ours is None:
            continue
        heads = rotary_heads(ours, shape)
        converted[ours] = tensor if heads is None else halves_to_pairs(tensor, heads)
    return converted


def hf_config(shape: GPTShape, dtype: str, bos_id: int | None, eos_id: int,
              pad_id: int | None) -> dict[str, Any]:
    """config.json of the `LlamaForCausalLM` that computes what `shape` computes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.d_model,
        "intermediate_size": shape.ffn_hidden,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_seq_len,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": shape.init_std,
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def shape_from_hf_config(config: dict[str, Any]) -> GPTShape:
    """The GPT shape of a Llama config.json; ValueError naming what raytron cannot run."""
    if config.get("model_type") != "llama":
        raise ValueError(f"its config.json has model_type {config.get('model_type')!r}; "
                         "raytron reads Llama-architecture models (model_type 'llama')")
    unsupported = [f"{key}={config[key]!r}" for key, fine in (
        ("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,)),
    ) if key in config and config[key] not in fine]
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        unsupported.append(f"rope_scaling={scaling!r}")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_parameters={rope!r}")
    d_model, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", d_model // heads) * heads != d_model:
        unsupported.append(f"head_dim={config['head_dim']} (raytron's is hidden_size / "
                           "num_attention_heads)")
    if unsupported:
        raise ValueError(f"raytron's GPT has no equivalent of {', '.join(unsupported)}")
    return GPTShape(
        n_layers=config["num_hidden_layers"], d_model=d_model, n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_hidden=config["intermediate_size"], vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
    )
