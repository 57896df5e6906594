"""Hugging Face Llama <-> raytron GPT: parameter names, the RoPE permutation, config.json.

The architectures are the same but for one detail: raytron's RoPE rotates consecutive
pairs of a head's dimensions (Meta's reference), transformers' rotates its two halves.
The q and k projections' rows are therefore permuted on the way out and back on the way
in (transformers' `convert_llama_weights_to_hf.py` does the same); without it the model
loads and is subtly wrong, which is why the tests compare logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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


def shape_from_hf_config(config: dict[str, Any], maxima: Mapping[str, int]) -> GPTShape:
    """The GPT shape of a Llama config.json. A folder is untrusted input: every value is
    checked before anything is sized by it, each size against `maxima` (config.json key of
    each of `SIZES` -> the largest value raytron accepts). ValueError naming what raytron
    cannot run, or each value that is wrong, and the fix."""
    if config.get("model_type") != "llama":
        raise ValueError(f"its config.json has model_type {config.get('model_type')!r}; "
                         "raytron reads Llama-architecture models (model_type 'llama'). Fix: "
                         "give a Llama-architecture model folder")
    unsupported = architecture_problems(config)
    if unsupported:
        raise ValueError(f"raytron's GPT has no equivalent of {', '.join(unsupported)}. Fix: "
                         "give a Llama-architecture model folder")
    problems = value_problems(config, maxima)
    if problems:
        raise ValueError(f"its config.json has {'; '.join(problems)}. Fix: correct these values "
                         "(`save_pretrained` writes a valid config.json)")
    heads, numbers = config["num_attention_heads"], floats_of(config)
    return GPTShape(
        n_layers=config["num_hidden_layers"], d_model=config["hidden_size"], n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_hidden=config["intermediate_size"], vocab_size=config["vocab_size"],
        max_seq_len=config.get("max_position_embeddings") or DEFAULT_POSITIONS,
        rope_theta=float(numbers["rope_theta"] or 10000.0),
        norm_eps=float(numbers["rms_norm_eps"] or 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(numbers["initializer_range"] or 0.02),
    )


SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim")
DEFAULTED_SIZES = ("num_key_value_heads", "max_position_embeddings", "head_dim")
DEFAULT_POSITIONS = 2048


def architecture_problems(config: dict[str, Any]) -> list[str]:
    """What a Llama `config` asks of the architecture that raytron's GPT does not compute."""
    unsupported = [f"{key}={config[key]!r}" for key, fine in (
        ("hidden_act", ("silu",)), ("attention_bias", (False,)), ("mlp_bias", (False,)),
    ) if key in config and config[key] not in fine]
    for key, old_name in (("rope_scaling", "type"), ("rope_parameters", "rope_type")):
        rope = config.get(key) or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get(old_name, "default")
                                                  ) != "default":
            unsupported.append(f"{key}={rope!r}")
    return unsupported


def value_problems(config: dict[str, Any], maxima: Mapping[str, int]) -> list[str]:
    """Each size, then (when they are all valid) how they divide, then each float and flag."""
    problems = [problem for key in SIZES
                if (problem := size_problem(key, config.get(key), maxima[key]))]
    problems = problems or layout_problems(config)
    problems += [f"{key}={value!r}, not a positive finite number"
                 for key, value in floats_of(config).items()
                 if value is not None and not is_positive_number(value)]
    if config.get("tie_word_embeddings") not in (None, True, False):
        problems.append(f"tie_word_embeddings={config['tie_word_embeddings']!r}, not true or "
                        "false")
    return problems


def size_problem(key: str, value: Any, maximum: int) -> str | None:
    """A size must be a whole number from 1 to `maximum` (or absent, where defaulted)."""
    if value is None:
        return None if key in DEFAULTED_SIZES else f"no {key}"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= maximum:
        return None
    return f"{key}={value!r}, not a whole number from 1 to {maximum}"


def layout_problems(config: dict[str, Any]) -> list[str]:
    """Heads must split the width into even head sizes, and kv heads the heads."""
    width, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if width % heads:
        return [f"hidden_size={width}, not divisible by num_attention_heads={heads}"]
    problems = []
    if config.get("head_dim") not in (None, width // heads):
        problems.append(f"head_dim={config['head_dim']}, not hidden_size / num_attention_heads "
                        f"= {width // heads} (the only head size raytron's GPT has)")
    elif (width // heads) % 2:
        problems.append(f"an odd head size hidden_size / num_attention_heads = {width // heads} "
                        "(rotary embeddings rotate pairs of dimensions)")
    if heads % kv_heads:
        problems.append(f"num_attention_heads={heads}, not divisible by num_key_value_heads="
                        f"{kv_heads}")
    return problems


def floats_of(config: dict[str, Any]) -> dict[str, Any]:
    """The floats of a Llama config.json as written (None: absent); transformers 5 keeps
    rope_theta in rope_parameters."""
    rope = config.get("rope_parameters") or {}
    return {"rope_theta": rope.get("rope_theta", config.get("rope_theta")),
            "rms_norm_eps": config.get("rms_norm_eps"),
            "initializer_range": config.get("initializer_range")}


def is_positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
