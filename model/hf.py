"""Hugging Face <-> raytron GPT: parameter names, the RoPE permutation, config.json, for
each family of `families.py`.

The architectures are the same but for one detail: raytron's RoPE rotates consecutive
pairs of a head's dimensions (Meta's reference), transformers' rotates its two halves.
The q and k projections' rows are therefore permuted on the way out and back on the way
in (transformers' `convert_llama_weights_to_hf.py` does the same), and so are their
biases and the gains of the per-head norms; without it the model loads and is subtly
wrong, which is why the tests compare logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from raytron.model.families import FAMILIES, Family
from raytron.model.spec import ROPE_SCALINGS, GPTShape

TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_name(name: str, family: Family) -> str:
    """The transformers name of a raytron parameter; KeyError for one the family lacks."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, index, inner = name.split(".", 2)  # layers.<i>.<inner>
    return f"model.layers.{index}.{family.layer_names[inner]}"


def raytron_name(name: str, family: Family) -> str | None:
    """The raytron name of a transformers parameter; None for one raytron has no use for
    (e.g. `rotary_emb.inv_freq`, which both compute)."""
    for ours, theirs in TOP_NAMES.items():
        if name == theirs:
            return ours
    parts = name.split(".", 3)  # model.layers.<i>.<inner>
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        for ours, theirs in family.layer_names.items():
            if parts[3] == theirs:
                return f"layers.{parts[2]}.{ours}"
    return None


def pairs_to_halves(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...)."""
    return tensor.unflatten(0, (heads, -1, 2)).transpose(1, 2).reshape(tensor.shape)


def halves_to_pairs(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    return tensor.unflatten(0, (heads, 2, -1)).transpose(1, 2).reshape(tensor.shape)


def rotary_heads(name: str, shape: GPTShape) -> int | None:
    """The number of heads whose rows to permute in a q or k projection (weight or bias)
    or a per-head norm's gain (one head's worth); None for every other parameter."""
    module = name.rsplit(".", 1)[0]
    if module.endswith("attention.wq"):
        return shape.n_heads
    if module.endswith("attention.wk"):
        return shape.n_kv_heads
    return 1 if module.endswith(("attention.q_norm", "attention.k_norm")) else None


def to_hf(state: dict[str, torch.Tensor], shape: GPTShape, family: Family
          ) -> dict[str, torch.Tensor]:
    """transformers' state dict of a raytron one (a tied head is left out, as transformers
    saves it)."""
    converted = {}
    for name, tensor in state.items():
        if name == "output.weight" and shape.tie_embeddings:
            continue
        heads = rotary_heads(name, shape)
        converted[hf_name(name, family)] = tensor if heads is None \
            else pairs_to_halves(tensor, heads)
    return converted


PEFT_PREFIX = "base_model.model."
PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}


def to_peft(adapters: dict[str, torch.Tensor], shape: GPTShape, family: Family
            ) -> dict[str, torch.Tensor]:
    """PEFT's state dict of LoRA adapters (`layers.<i>.attention.wq.lora_a` ->
    `base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`), and of weights
    trained whole beside them (`base_model.model.lm_head.weight`). B's rows are the
    weight's output rows, permuted as the weight is for q and k; A's are not."""
    converted = {}
    for name, tensor in adapters.items():
        module, kind = name.rsplit(".", 1)
        if kind not in PEFT_NAMES:  # trained whole (modules_to_save): under its own name
            converted[f"{PEFT_PREFIX}{hf_name(name, family)}"] = tensor
            continue
        heads = rotary_heads(name, shape) if kind == "lora_b" else None
        target = hf_name(f"{module}.weight", family).removesuffix(".weight")
        converted[f"{PEFT_PREFIX}{target}.{PEFT_NAMES[kind]}.weight"] = \
            tensor if heads is None else pairs_to_halves(tensor, heads)
    return converted


def from_peft(state: dict[str, torch.Tensor], shape: GPTShape, family: Family
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """raytron's adapters of PEFT's LoRA state dict, as (A, B) by module
    (`layers.<i>.attention.wq`): `to_peft` inverted. ValueError naming a tensor that is
    neither a LoRA A nor B of a projection the family has (an embedding's, DoRA's)."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        inner = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
        module, _, kind = inner.rpartition(".")
        ours = raytron_name(f"{module}.weight", family) if kind in ("lora_A", "lora_B") \
            else None
        if not key.startswith(PEFT_PREFIX) or ours is None:
            raise ValueError(f"{key} is not the LoRA A or B of a projection of a "
                             f"{family.model_type} model")
        module = ours.removesuffix(".weight")
        heads = rotary_heads(ours, shape) if kind == "lora_B" else None
        halves.setdefault(module, {})[kind] = \
            tensor if heads is None else halves_to_pairs(tensor, heads)
    missing = sorted(module for module, pair in halves.items() if len(pair) != 2)
    if missing:
        raise ValueError(f"{missing[0]} has only one of its A and B")
    return {module: (pair["lora_A"], pair["lora_B"]) for module, pair in halves.items()}


def peft_target_modules(modules: list[str], family: Family) -> list[str]:
    """PEFT's `target_modules` (q_proj, down_proj...) of raytron's module names."""
    names = {family.layer_names[f"{module}.weight"].removesuffix(".weight").rsplit(".", 1)[-1]
             for module in modules}
    return sorted(names)


def from_hf(state: dict[str, torch.Tensor], shape: GPTShape, family: Family
            ) -> dict[str, torch.Tensor]:
    converted = {}
    for name, tensor in state.items():
        ours = raytron_name(name, family)
        if ours is None:
            continue
        heads = rotary_heads(ours, shape)
        converted[ours] = tensor if heads is None else halves_to_pairs(tensor, heads)
    return converted


def hf_config(shape: GPTShape, family: Family, dtype: str, bos_id: int | None, eos_id: int,
              pad_id: int | None) -> dict[str, Any]:
    """config.json of the family's model that computes what `shape` computes."""
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
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
        "rope_scaling": rope_scaling_config(shape),
        "attention_dropout": 0.0,
        "initializer_range": shape.init_std,
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
        **family.config_fields(shape.n_layers),
    }


# rope type -> (config.json key, GPTShape field) of its parameters
ROPE_FIELDS = {
    "linear": (("factor", "rope_factor"),),
    "llama3": (("factor", "rope_factor"), ("low_freq_factor", "rope_low_freq_factor"),
               ("high_freq_factor", "rope_high_freq_factor"),
               ("original_max_position_embeddings", "rope_original_max_seq_len")),
    "yarn": (("factor", "rope_factor"), ("beta_fast", "rope_beta_fast"),
             ("beta_slow", "rope_beta_slow"),
             ("original_max_position_embeddings", "rope_original_max_seq_len"),
             ("attention_factor", "rope_attention_factor")),
}


def rope_scaling_config(shape: GPTShape) -> dict[str, Any] | None:
    """config.json's `rope_scaling` (the form transformers 4 and 5 both read)."""
    if shape.rope_scaling == "none":
        return None
    fields = {key: getattr(shape, field) for key, field in ROPE_FIELDS[shape.rope_scaling]}
    return {"rope_type": shape.rope_scaling,
            **{key: value for key, value in fields.items() if value is not None}}


def shape_from_hf_config(config: dict[str, Any], maxima: Mapping[str, int]) -> GPTShape:
    """The GPT shape of a config.json. A folder is untrusted input: every value is
    checked before anything is sized by it, each size against `maxima` (config.json key of
    each of `SIZES` -> the largest value raytron accepts). ValueError naming what raytron
    cannot run, or each value that is wrong, and the fix."""
    family = family_of(config)
    unsupported = family.refusals(config) + architecture_problems(config)
    if unsupported:
        raise ValueError(f"raytron's GPT has no equivalent of {', '.join(unsupported)}. Fix: "
                         f"give a model without {'them' if len(unsupported) > 1 else 'it'} "
                         "(the README's \"Bring your own model\" lists what raytron runs)")
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
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        qkv_bias=family.qkv_bias, qk_norm=family.qk_norm,
        **rope_shape_fields(config),
    )


def family_of(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"its config.json has model_type {model_type!r}; raytron reads the "
                         f"families {', '.join(map(repr, FAMILIES))}. Fix: give a model of "
                         "one of them")
    return FAMILIES[model_type]


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters, wherever the config.json keeps them: transformers 5 writes
    `rope_parameters` (with rope_theta), older ones `rope_scaling` (`type` before
    `rope_type`)."""
    merged = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if isinstance(value, dict):
            merged.update(value)
    merged.setdefault("rope_type", merged.get("type", "default"))
    return merged


def rope_shape_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The GPTShape rope_* fields of a checked config.json."""
    rope = rope_parameters(config)
    kind = "none" if rope["rope_type"] == "default" else rope["rope_type"]
    positions = config.get("max_position_embeddings") or DEFAULT_POSITIONS
    rope.setdefault("original_max_position_embeddings", positions)
    if kind == "yarn" and rope.get("factor") is None:  # transformers' default
        rope["factor"] = positions / rope["original_max_position_embeddings"]
    return {"rope_scaling": kind, **{field: rope[key] for key, field in ROPE_FIELDS.get(kind, ())
                                     if rope.get(key) is not None}}


SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
         "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim")
DEFAULTED_SIZES = ("num_key_value_heads", "max_position_embeddings", "head_dim")
DEFAULT_POSITIONS = 2048


def architecture_problems(config: dict[str, Any]) -> list[str]:
    """What `config` asks of the block that raytron's GPT does not compute, in any family."""
    unsupported = [f"hidden_act={config['hidden_act']!r}"] \
        if config.get("hidden_act", "silu") != "silu" else []
    rope = rope_parameters(config)
    if rope["rope_type"] != "default" and rope["rope_type"] not in ROPE_SCALINGS:
        unsupported.append(f"rope_type={rope['rope_type']!r}")
    if rope.get("truncate", True) is not True:
        unsupported.append(f"rope truncate={rope['truncate']!r}")
    unsupported += [f"rope {key}={rope[key]!r}" for key in ("mscale", "mscale_all_dim")
                    if rope.get(key)]
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        unsupported.append(f"partial_rotary_factor={partial!r}")
    return unsupported


def value_problems(config: dict[str, Any], maxima: Mapping[str, int]) -> list[str]:
    """Each size, then (when they are all valid) how they divide, then each float and flag."""
    problems = [problem for key in SIZES
                if (problem := size_problem(key, config.get(key), maxima[key]))]
    problems = problems or layout_problems(config)
    problems += [f"{key}={value!r}, not a positive finite number"
                 for key, value in floats_of(config).items()
                 if value is not None and not is_positive_number(value)]
    problems += [f"{key}={config[key]!r}, not an object" for key in ("rope_scaling",
                 "rope_parameters") if not isinstance(config.get(key) or {}, dict)]
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
    """Heads must have an even size (hidden_size / num_attention_heads unless head_dim says
    otherwise), and kv heads must divide the heads."""
    width, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    problems = []
    if config.get("head_dim") is None and width % heads:
        problems.append(f"hidden_size={width}, not divisible by num_attention_heads={heads} "
                        "(and no head_dim)")
    elif (config.get("head_dim") or width // heads) % 2:
        problems.append(f"an odd head size {config.get('head_dim') or width // heads} (rotary "
                        "embeddings rotate pairs of dimensions)")
    if heads % kv_heads:
        problems.append(f"num_attention_heads={heads}, not divisible by num_key_value_heads="
                        f"{kv_heads}")
    original = rope_parameters(config).get("original_max_position_embeddings")
    if original is not None and not (isinstance(original, int) and original >= 1):
        problems.append(f"original_max_position_embeddings={original!r}, not a whole number "
                        "of 1 or more")
    return problems


ROPE_FLOATS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
               "attention_factor")


def floats_of(config: dict[str, Any]) -> dict[str, Any]:
    """The floats of a config.json as written (None: absent); transformers 5 keeps
    rope_theta in rope_parameters."""
    rope = rope_parameters(config)
    return {"rope_theta": rope.get("rope_theta", config.get("rope_theta")),
            "rms_norm_eps": config.get("rms_norm_eps"),
            "initializer_range": config.get("initializer_range"),
            **{key: rope.get(key) for key in ROPE_FLOATS}}


def is_positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
