"""The Hugging Face model families raytron's GPT computes, one adapter each (torchtitan
keeps a `state_dict_adapter.py` per model): what each family's attention has, which of
its config.json options raytron cannot compute, the config.json it exports, and the
transformers names of its parameters.

The four share transformers' parameter names and the SwiGLU block; they differ in the
attention: Qwen2 has biases on q, k and v, Qwen3 an RMSNorm on each head's query and key
(and an explicit head size); Llama and Mistral neither. A raytron model's family follows
it from import to export, so a fine-tuned Qwen3 loads again as `Qwen3ForCausalLM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# raytron name (in a layer) -> transformers name (in model.layers.<i>)
BLOCK_NAMES = {
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
BIAS_NAMES = {"attention.wq.bias": "self_attn.q_proj.bias",
              "attention.wk.bias": "self_attn.k_proj.bias",
              "attention.wv.bias": "self_attn.v_proj.bias"}
HEAD_NORM_NAMES = {"attention.q_norm.weight": "self_attn.q_norm.weight",
                   "attention.k_norm.weight": "self_attn.k_norm.weight"}


@dataclass(frozen=True)
class Family:
    """A family's attention options (fixed by its transformers class) and what sets it apart
    in config.json."""

    model_type: str
    architecture: str
    qkv_bias: bool = False
    qk_norm: bool = False

    @property
    def layer_names(self) -> dict[str, str]:
        """raytron -> transformers names of one block's parameters."""
        return {**BLOCK_NAMES, **(BIAS_NAMES if self.qkv_bias else {}),
                **(HEAD_NORM_NAMES if self.qk_norm else {})}

    def refusals(self, config: dict[str, Any]) -> list[str]:
        """The options of `config` this family's transformers class has and raytron's GPT
        does not compute, as `field=value`."""
        return []

    def config_fields(self, n_layers: int) -> dict[str, Any]:
        """The family's own config.json keys, for a model that uses none of its refusals."""
        return {}


class Llama(Family):
    def refusals(self, config: dict[str, Any]) -> list[str]:
        # attention_bias puts a bias on the output projection too, which raytron has not
        return flags_set(config, "attention_bias", "mlp_bias")

    def config_fields(self, n_layers: int) -> dict[str, Any]:
        return {"attention_bias": False, "mlp_bias": False}


class Mistral(Family):
    def refusals(self, config: dict[str, Any]) -> list[str]:
        window = config.get("sliding_window")
        return [] if window is None else [f"sliding_window={window!r}"]

    def config_fields(self, n_layers: int) -> dict[str, Any]:
        return {"sliding_window": None}


class Qwen(Family):
    """Qwen2 and Qwen3: a sliding window configured per layer, which raytron refuses."""

    def refusals(self, config: dict[str, Any]) -> list[str]:
        refused = flags_set(config, "use_sliding_window")
        if self.qk_norm:  # Qwen3's attention_bias also biases the output projection
            refused += flags_set(config, "attention_bias")
        layer_types = config.get("layer_types") or []
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            refused.append(f"layer_types={layer_types!r}")
        return refused

    def config_fields(self, n_layers: int) -> dict[str, Any]:
        return {"use_sliding_window": False, "sliding_window": None,
                "max_window_layers": n_layers, "layer_types": ["full_attention"] * n_layers,
                **({"attention_bias": False} if self.qk_norm else {})}


FAMILIES = {family.model_type: family for family in (
    Llama("llama", "LlamaForCausalLM"),
    Mistral("mistral", "MistralForCausalLM"),
    Qwen("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
    Qwen("qwen3", "Qwen3ForCausalLM", qk_norm=True),
)}
DEFAULT_FAMILY = "llama"


def flags_set(config: dict[str, Any], *keys: str) -> list[str]:
    return [f"{key}={config[key]!r}" for key in keys if config.get(key) not in (None, False)]
