"""A model as data, without torch: its shape and the choices of its adapters, data
parallelism. The config and the commands that only read configs
(`raytron config`, `--help`, a refused config) use these and never import torch, which
takes seconds to load."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GPTShape:
    """The shape of a GPT, every field resolved (no 'derive this' placeholders)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    head_dim: int | None = None  # None: d_model // n_heads
    qkv_bias: bool = False  # a bias on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's query and key, before RoPE (Qwen3)
    rope_scaling: str = "none"  # none | linear | llama3 | yarn
    rope_factor: float = 1.0  # how much longer the context is than the pre-trained one
    rope_original_max_seq_len: int | None = None  # the pre-trained context (llama3, yarn)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    rope_attention_factor: float | None = None  # yarn's cos/sin scale; None: 0.1 ln(factor) + 1

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)


def llama_ffn_hidden(d_model: int, multiple_of: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4*d (same parameters as a 4*d GELU MLP), rounded up."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


# Short names users give (PEFT's target_modules for Llama, shortened) -> module paths in
# a block, and the names Hugging Face Llama/Qwen checkpoints give the same projections.
TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv",
           "o": "attention.wo", "gate": "feed_forward.w1", "up": "feed_forward.w3",
           "down": "feed_forward.w2"}


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)
    # the token embeddings and the head train whole too (PEFT's modules_to_save): what a
    # chat template's tokens that the base never trained on need
    train_embeddings: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


DP_SHARD_MODES = ("full", "grad-op", "none")
