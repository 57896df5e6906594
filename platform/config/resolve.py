"""Turning config values into what they stand for: the model shape, the recomputation
interval, and the defaults derived from other keys (what the layout's keys stand for is
`layout.py`'s)."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from raytron.model.families import FAMILIES
from raytron.model.spec import GPTShape, LoraSpec, llama_ffn_hidden
from raytron.pipelines.sources import SAMPLE_FORMATS, sample_kind
from raytron.platform.config.layout import Layout
from raytron.platform.config.rules import is_count
from raytron.platform.config.schema import (
    AUTO,
    RECOMPUTE_NAMED,
    REPLICAS,
    DataConfig,
    LoraConfig,
    ModelConfig,
    RaytronConfig,
)

if TYPE_CHECKING:
    from raytron.model.gpt import GPT


def resolve_model(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """Fill the fields left to derive: vocabulary (padded), KV heads, head size, MLP width."""
    multiple = model.vocab_multiple_of
    return dataclasses.replace(
        model,
        vocab_size=model.vocab_size or multiple * -(-tokenizer_vocab // multiple),
        n_kv_heads=model.n_kv_heads or model.n_heads,
        head_dim=model.head_dim or model.d_model // model.n_heads,
        ffn_hidden=model.ffn_hidden or llama_ffn_hidden(model.d_model, model.ffn_multiple_of),
    )


def gpt_shape(model: ModelConfig) -> GPTShape:
    """The shape of a resolved model section; the family sets the attention's options."""
    fields = {f.name for f in dataclasses.fields(GPTShape)}
    values = {k: v for k, v in dataclasses.asdict(model).items() if k in fields}
    missing = [k for k, v in values.items() if v is None and k != "rope_attention_factor"]
    if missing:
        raise ValueError(f"model fields {missing} are unresolved; call resolve_model first")
    family = FAMILIES[model.family]
    return GPTShape(**values, qkv_bias=family.qkv_bias, qk_norm=family.qk_norm)


def model_fields(shape: GPTShape, family: str) -> dict:
    """The model section's keys that give `shape` (gpt_shape's inverse); a field the shape
    leaves None is left out, for the section's default to derive it."""
    keys = {f.name for f in dataclasses.fields(ModelConfig)}
    return {**{k: v for k, v in dataclasses.asdict(shape).items()
               if k in keys and v is not None}, "family": family}


def lora_spec(lora: LoraConfig) -> LoraSpec | None:
    """The adapters `train.lora` asks for; None: none (the whole model trains)."""
    if not lora.rank:
        return None
    return LoraSpec(lora.rank, lora.alpha, lora.dropout, tuple(dict.fromkeys(lora.targets)),
                    lora.train_embeddings)


def trained_model(config: RaytronConfig) -> GPT:
    """The config's whole model on the meta device, with its LoRA adapters (and its base
    frozen) when train.lora asks for them."""
    import torch

    from raytron.model.gpt import GPT
    from raytron.model.lora import add_adapters

    spec = lora_spec(config.train.lora)
    with torch.device("meta"):
        model = GPT(gpt_shape(config.model))
        return add_adapters(model, spec) if spec else model


def step_flops_per_token(config: RaytronConfig) -> float:
    """The model FLOPs a training step spends per token: forward and backward, and under
    DPO with LoRA the reference model's forward pass (the base's, the adapters off)
    besides (a full fine-tune's reference is computed once, before the first step)."""
    import torch

    from raytron.model.gpt import GPT

    seq_len = config.data.seq_len
    flops = trained_model(config).flops_per_token(seq_len)
    if config.train.objective == "dpo" and config.train.lora.rank:
        with torch.device("meta"):
            flops += GPT(gpt_shape(config.model)).forward_flops_per_token(seq_len)
    return flops


def packs_samples(data: DataConfig) -> bool:
    """`data.packing`, with `auto` meaning samples when any source holds fine-tuning samples."""
    if data.packing != AUTO:
        return data.packing == "samples"
    return any(sample_kind(s.path, s.format) in SAMPLE_FORMATS for s in data.sources)


def recompute_every(setting: int | str) -> int:
    """`train.activation_checkpointing`: none -> 0, full and selective -> 1 (every layer),
    k -> every k-th layer."""
    return RECOMPUTE_NAMED[setting] if setting in RECOMPUTE_NAMED else int(setting)


def selective_recompute(setting: int | str) -> bool:
    """Whether recomputed blocks keep their matmul outputs (`selective`)."""
    return setting == "selective"


def cluster_address(config: RaytronConfig) -> str | None:
    """The Ray cluster to join: `cluster.address`, else $RAY_ADDRESS; None: start one."""
    return config.cluster.address or os.environ.get("RAY_ADDRESS")


def with_derived_defaults(config: RaytronConfig, explicit: set[str]) -> RaytronConfig:
    """`cluster.workers` from the layout when unset; a micro-batch size that gives the
    pipeline schedule the micro-batches it needs, unless the user set `train.micro_batch`.
    Leaves invalid values alone: validation names them."""
    p, c = config.parallel, config.cluster
    if c.workers is None and all(is_count(v) for v in (p.pp, p.dp, p.tp)):
        c = dataclasses.replace(c, workers=Layout.of(config).world)
    config = dataclasses.replace(config, cluster=c)
    if "train.micro_batch" in explicit:
        return config
    micro = fitting_micro_batch(config)
    if micro is None or micro == config.train.micro_batch:
        return config
    return dataclasses.replace(config, train=dataclasses.replace(config.train, micro_batch=micro))


def fitting_micro_batch(config: RaytronConfig) -> int | None:
    """The largest micro-batch size up to `train.micro_batch` whose micro-batches per
    schedule call suit the pipeline schedule; None when none does, or nothing to fit."""
    p, t, c = config.parallel, config.train, config.cluster
    counts = (p.pp, p.tp, t.global_batch, t.micro_batch, p.virtual_stages)
    if not all(is_count(v) for v in counts) or p.pp == 1 or not is_count(c.workers):
        return None
    if not (p.dp == AUTO or is_count(p.dp)):
        return None
    layout = Layout.of(config)
    if c.workers % layout.replica_size:
        return None
    replica, rest = divmod(t.global_batch, layout.dp)
    if rest or replica == 0 or (p.microbatches is not None and not is_count(p.microbatches)):
        return None
    pairs = 2 if t.objective == "dpo" else 1  # a micro-batch holds whole pairs
    for micro in range(min(t.micro_batch, replica), 0, -1):
        if replica % micro == 0 and micro % pairs == 0 \
                and not schedule_shortfall(config, replica // micro):
            return micro
    return None


def schedule_shortfall(config: RaytronConfig, micro_batches: int) -> str | None:
    """What the pipeline schedule lacks with `micro_batches` per replica step; None: fine."""
    p = config.parallel
    per_call = p.microbatches or micro_batches
    if micro_batches % per_call:
        return (f"parallel.microbatches={per_call} does not divide the {micro_batches} "
                "micro-batches of a replica's step (train.global_batch / (train.micro_batch "
                "* dp))")
    if p.schedule in ("1f1b", "interleaved-1f1b") and per_call < p.pp:
        return (f"{p.schedule} needs at least parallel.pp={p.pp} micro-batches per schedule "
                f"call, got {per_call}")
    if p.schedule == "interleaved-1f1b" and per_call % p.pp:
        return (f"interleaved-1f1b needs the micro-batches per call ({per_call}) to be a "
                f"multiple of parallel.pp={p.pp}")
    return None


def replica_config(config: RaytronConfig) -> RaytronConfig:
    """The config of one replica in faults.mode=replicas: one worker holding the whole
    model, its own layout."""
    return dataclasses.replace(
        config, parallel=dataclasses.replace(config.parallel, dp=1),
        cluster=dataclasses.replace(config.cluster, workers=1))


def snapshot_layout(config: RaytronConfig) -> Layout:
    """The layout a worker group's snapshots are written in: its own, or one replica's."""
    return Layout.of(replica_config(config) if config.faults.mode == REPLICAS else config)
