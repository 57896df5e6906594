"""Turning the model section of a config into a fully resolved model shape."""

from __future__ import annotations

import dataclasses

from raytron.model.gpt import GPTShape, llama_ffn_hidden
from raytron.platform.config import ModelConfig


def resolve_model(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """Fill the fields left to derive: vocabulary (padded), KV heads, MLP width."""
    multiple = model.vocab_multiple_of
    return dataclasses.replace(
        model,
        vocab_size=model.vocab_size or multiple * -(-tokenizer_vocab // multiple),
        n_kv_heads=model.n_kv_heads or model.n_heads,
        ffn_hidden=model.ffn_hidden or llama_ffn_hidden(model.d_model, model.ffn_multiple_of),
    )


def gpt_shape(model: ModelConfig) -> GPTShape:
    """The shape of a resolved model section."""
    fields = {f.name for f in dataclasses.fields(GPTShape)}
    values = {k: v for k, v in dataclasses.asdict(model).items() if k in fields}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"model fields {missing} are unresolved; call resolve_model first")
    return GPTShape(**values)
