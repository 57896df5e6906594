"""Rules a config must satisfy before any Ray resource is taken.

Each rule names the key, the value and the fix, and all problems are reported at once,
so that a user fixes a config in one round instead of one error per launch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raytron.model.parallelize import DP_SHARD_MODES
from raytron.model.pipeline import stages_per_rank
from raytron.pipelines.sources import SourceError, list_files
from raytron.platform.config import ConfigError, RaytronConfig
from raytron.platform.faults import parse_injections
from raytron.platform.layout import resolve_dp
from raytron.platform.placement import cluster_address

PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")
FORMATS = ("auto", "text", "jsonl", "parquet")
DOCUMENTS = ("file", "paragraph")


def validate(config: RaytronConfig, check_paths: bool = True) -> None:
    """Raise `ConfigError` listing every problem of `config`."""
    problems = (
        model_problems(config)
        + parallel_problems(config)
        + train_problems(config)
        + data_problems(config, check_paths)
        + checkpoint_problems(config)
        + fault_problems(config)
    )
    if problems:
        raise ConfigError(problems)


def positive(config: RaytronConfig, *keys: str) -> list[str]:
    problems = []
    for key in keys:
        value = lookup(config, key)
        if value is not None and value <= 0:
            problems.append(f"{key}={value} must be positive. Fix: set {key} to 1 or more.")
    return problems


def one_of(key: str, value, choices: tuple[str, ...]) -> list[str]:
    if value in choices:
        return []
    return [f"{key}='{value}' is unknown. Fix: use one of {', '.join(choices)}."]


def lookup(config: RaytronConfig, key: str):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def model_problems(config: RaytronConfig) -> list[str]:
    m, tp = config.model, config.parallel.tp
    problems = positive(
        config, "model.n_layers", "model.d_model", "model.n_heads", "model.n_kv_heads",
        "model.ffn_hidden", "model.vocab_size", "model.vocab_multiple_of", "model.max_seq_len",
    )
    if problems:
        return problems
    if m.d_model % m.n_heads:
        problems.append(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}. "
            "Fix: pick n_heads among the divisors of d_model "
            f"(e.g. {nearest_divisor(m.d_model, m.n_heads)})."
        )
    elif (m.d_model // m.n_heads) % 2:
        problems.append(
            f"head size model.d_model/model.n_heads={m.d_model // m.n_heads} is odd; rotary "
            "embeddings need an even head size. Fix: change model.n_heads or model.d_model."
        )
    kv_heads = m.n_kv_heads or m.n_heads
    if m.n_heads % kv_heads:
        problems.append(
            f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={kv_heads}. "
            "Fix: set n_kv_heads to a divisor of n_heads "
            f"(e.g. {nearest_divisor(m.n_heads, kv_heads)})."
        )
    if m.n_heads % tp or kv_heads % tp:
        problems.append(
            f"model.n_heads={m.n_heads} and model.n_kv_heads={kv_heads} must both be divisible by "
            f"parallel.tp={tp}. Fix: lower parallel.tp or raise the head counts."
        )
    if m.init_std <= 0:
        problems.append(f"model.init_std={m.init_std} must be positive. Fix: use e.g. 0.02.")
    return problems


def parallel_problems(config: RaytronConfig) -> list[str]:
    p, c, m = config.parallel, config.cluster, config.model
    problems = positive(config, "parallel.pp", "parallel.tp", "parallel.microbatches",
                        "parallel.virtual_stages", "cluster.workers", "cluster.cpus_per_worker")
    if not (p.dp == "auto" or (isinstance(p.dp, int) and p.dp >= 1)):
        problems.append(f"parallel.dp={p.dp!r} must be a positive number or auto. Fix: set "
                        "parallel.dp=auto to use every worker, or e.g. parallel.dp=2.")
    if problems:
        return problems
    problems += one_of("parallel.schedule", p.schedule, SCHEDULES)
    problems += one_of("parallel.dp_shard", p.dp_shard, DP_SHARD_MODES)
    if p.dp == "auto" and c.workers % (p.pp * p.tp):
        problems.append(
            f"parallel.dp=auto: cluster.workers={c.workers} is not a multiple of parallel.pp*tp "
            f"= {p.pp * p.tp}. Fix: use a multiple of {p.pp * p.tp} workers."
        )
    elif p.pp * dp_of(config) * p.tp != c.workers:
        problems.append(
            f"parallel.pp*dp*tp = {p.pp}*{p.dp}*{p.tp} = {p.pp * dp_of(config) * p.tp} differs "
            f"from cluster.workers={c.workers}. Fix: set cluster.workers="
            f"{p.pp * dp_of(config) * p.tp}, change the layout, or set parallel.dp=auto."
        )
    if p.tp > 1:
        problems += tensor_parallel_problems(config)
    if p.pp > 1:
        problems += pipeline_problems(config)
    if c.gpus_per_worker is not None and c.gpus_per_worker < 0:
        problems.append(
            f"cluster.gpus_per_worker={c.gpus_per_worker} is negative. Fix: use 0, 1 or leave it "
            "unset to use GPUs when the cluster has them."
        )
    if m.n_layers < stage_count(config):
        problems.append(
            f"model.n_layers={m.n_layers} is fewer than the {stage_count(config)} pipeline "
            "stages. Fix: lower parallel.pp (or parallel.virtual_stages)."
        )
    return problems


def dp_of(config: RaytronConfig) -> int:
    """The resolved dp, or 1 while the layout itself is invalid (reported elsewhere)."""
    p = config.parallel
    if min(p.pp, p.tp) < 1 or not (p.dp == "auto" or isinstance(p.dp, int) and p.dp >= 1):
        return 1
    return max(1, resolve_dp(p.dp, config.cluster.workers, p.pp, p.tp))


def stage_count(config: RaytronConfig) -> int:
    return config.parallel.pp * stages_per_rank(config.parallel.schedule,
                                                config.parallel.virtual_stages)


def tensor_parallel_problems(config: RaytronConfig) -> list[str]:
    m, tp, problems = config.model, config.parallel.tp, []
    for key in ("ffn_hidden", "vocab_size"):
        value = getattr(m, key)
        if value is not None and value % tp:
            problems.append(f"model.{key}={value} is not divisible by parallel.tp={tp}. "
                            f"Fix: use a multiple of {tp}.")
    if m.vocab_size is None and m.vocab_multiple_of % tp:
        problems.append(f"model.vocab_multiple_of={m.vocab_multiple_of} is not divisible by "
                        f"parallel.tp={tp}; the padded vocabulary must split over tp. "
                        f"Fix: use a multiple of {tp} (e.g. {tp * 64}).")
    if m.ffn_hidden is None and m.ffn_multiple_of % tp:
        problems.append(f"model.ffn_multiple_of={m.ffn_multiple_of} is not divisible by "
                        f"parallel.tp={tp}. Fix: use a multiple of {tp}.")
    if config.parallel.sequence_parallel and config.data.seq_len % tp:
        problems.append(f"data.seq_len={config.data.seq_len} is not divisible by parallel.tp="
                        f"{tp}, which sequence parallelism splits it over. Fix: use a multiple "
                        f"of {tp}, or parallel.sequence_parallel=false.")
    return problems


def pipeline_problems(config: RaytronConfig) -> list[str]:
    p, t, problems = config.parallel, config.train, []
    if config.model.tie_embeddings:
        problems.append("model.tie_embeddings=true cannot be split over pipeline stages (the "
                        "embedding lives on the first, the head on the last). Fix: set "
                        "model.tie_embeddings=false.")
    micro_batches = t.global_batch // max(1, t.micro_batch * dp_of(config))
    per_call = p.microbatches or micro_batches
    if micro_batches % per_call:
        problems.append(
            f"parallel.microbatches={per_call} does not divide the {micro_batches} micro-"
            f"batches of a replica's step (train.global_batch / (train.micro_batch * dp)). "
            "Fix: pick a divisor, or leave parallel.microbatches unset."
        )
    if p.schedule in ("1f1b", "interleaved-1f1b") and per_call < p.pp:
        problems.append(
            f"{p.schedule} needs at least parallel.pp={p.pp} micro-batches per schedule call, "
            f"got {per_call}. Fix: raise train.global_batch or lower train.micro_batch."
        )
    if p.schedule == "interleaved-1f1b" and per_call % p.pp:
        problems.append(f"interleaved-1f1b needs the micro-batches per call ({per_call}) to be "
                        f"a multiple of parallel.pp={p.pp}. Fix: change parallel.microbatches.")
    if p.schedule == "interleaved-1f1b" and p.virtual_stages < 2:
        problems.append("interleaved-1f1b needs parallel.virtual_stages >= 2. Fix: set "
                        "parallel.virtual_stages=2, or use parallel.schedule=1f1b.")
    if p.layers_per_stage is not None and (
        len(p.layers_per_stage) != stage_count(config)
        or sum(p.layers_per_stage) != config.model.n_layers
        or min(p.layers_per_stage) < 1
    ):
        problems.append(
            f"parallel.layers_per_stage={list(p.layers_per_stage)} must list "
            f"{stage_count(config)} positive counts (one per stage) summing to model.n_layers="
            f"{config.model.n_layers}. Fix: correct it, or leave it unset for an even split."
        )
    return problems


def resolve_layout(config: RaytronConfig) -> RaytronConfig:
    """`parallel.dp=auto` replaced by the replicas cluster.workers allow (after `validate`)."""
    p = config.parallel
    if p.dp != "auto":
        return config
    return dataclasses.replace(config, parallel=dataclasses.replace(p, dp=dp_of(config)))


def train_problems(config: RaytronConfig) -> list[str]:
    t, dp = config.train, dp_of(config)
    problems = positive(config, "train.global_batch", "train.micro_batch", "train.steps",
                        "train.lr", "train.log_interval")
    if problems:
        return problems
    if t.global_batch % (t.micro_batch * dp):
        step = t.micro_batch * dp
        problems.append(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch * "
            f"parallel.dp = {t.micro_batch}*{dp} = {step}. Fix: set train.global_batch to a "
            f"multiple of {step} (e.g. {max(step, round(t.global_batch / step) * step)})."
        )
    if not 0 <= t.min_lr <= t.lr:
        problems.append(
            f"train.min_lr={t.min_lr} must lie between 0 and train.lr={t.lr}. "
            f"Fix: set train.min_lr to e.g. {t.lr / 10:g}."
        )
    for key in ("beta1", "beta2"):
        value = getattr(t, key)
        if not 0 <= value < 1:
            problems.append(f"train.{key}={value} must lie in [0, 1). Fix: use e.g. 0.9 or 0.95.")
    for key in ("weight_decay", "grad_clip", "eval_interval", "warmup_steps"):
        if getattr(t, key) < 0:
            problems.append(f"train.{key}={getattr(t, key)} is negative. Fix: use 0 or more.")
    problems += one_of("train.precision", t.precision, PRECISIONS)
    if not (t.activation_checkpointing in ("none", "full")
            or isinstance(t.activation_checkpointing, int) and t.activation_checkpointing >= 1):
        problems.append(
            f"train.activation_checkpointing={t.activation_checkpointing!r} is unknown. Fix: use "
            "none, full, or k >= 1 to recompute every k-th layer."
        )
    if t.peak_flops is not None and t.peak_flops <= 0:
        problems.append(
            f"train.peak_flops={t.peak_flops} must be positive. Fix: give the device's peak "
            "FLOP/s (e.g. 989e12 for an H100 in bf16) or leave it unset."
        )
    return problems


def data_problems(config: RaytronConfig, check_paths: bool) -> list[str]:
    d = config.data
    problems = positive(config, "data.seq_len", "data.val_sequences", "data.prefetch_steps",
                        "data.tokenizer_sample_mb", "data.max_document_mb")
    workers = d.tokenizer_workers
    if not (workers == "auto" or isinstance(workers, int) and workers >= 1):
        problems.append(f"data.tokenizer_workers={workers!r} must be a positive number or auto. "
                        "Fix: use e.g. 2, or auto to use the CPUs the training workers leave.")
    if not d.sources:
        problems.append("data.sources is empty. Fix: give at least one source with a path.")
    if d.shuffle_window < 0:
        problems.append(f"data.shuffle_window={d.shuffle_window} is negative. Fix: use 0 (no "
                        "shuffle) or the number of documents to shuffle together.")
    if not 0 <= d.val_share < 1:
        problems.append(
            f"data.val_share={d.val_share} must lie in [0, 1). Fix: use e.g. 0.05 (0 disables "
            "validation)."
        )
    if d.tokenizer is None and d.vocab_size < 512:
        problems.append(
            f"data.vocab_size={d.vocab_size} is too small for a byte-level BPE tokenizer "
            "(256 byte tokens come first). Fix: use 512 or more."
        )
    for group in ("sources", "validation_sources"):
        for index, source in enumerate(getattr(d, group)):
            problems += source_problems(f"data.{group}.{index}", source, check_paths)
    if check_paths and d.tokenizer is not None and not Path(d.tokenizer).is_file():
        problems.append(
            f"data.tokenizer='{d.tokenizer}' is not a file. Fix: give the path of a "
            "tokenizer.json, or leave it unset to train one on the corpus."
        )
    return problems


def source_problems(key: str, source, check_paths: bool) -> list[str]:
    problems = one_of(f"{key}.format", source.format, FORMATS)
    problems += one_of(f"{key}.document", source.document, DOCUMENTS)
    if not source.weight > 0:
        problems.append(f"{key}.weight={source.weight} must be positive. Fix: give each source "
                        "a positive weight (they are normalized to shares).")
    if source.epochs is not None and source.epochs < 1:
        problems.append(f"{key}.epochs={source.epochs} must be 1 or more. Fix: use a positive "
                        "number, or leave it unset to repeat the source forever.")
    if check_paths and not problems:
        try:
            list_files(source.path)
        except SourceError as error:
            problems.append(f"{key}.path: {error}")
    return problems


def checkpoint_problems(config: RaytronConfig) -> list[str]:
    return positive(config, "checkpoint.interval", "checkpoint.keep_last")


def fault_problems(config: RaytronConfig) -> list[str]:
    f = config.faults
    problems = positive(config, "faults.hang_timeout_s", "faults.min_dp",
                        "faults.schedule_timeout_s", "faults.capacity_check_s")
    if f.min_dp > 1 and config.parallel.dp != "auto":
        problems.append(f"faults.min_dp={f.min_dp} applies only to elastic runs. Fix: set "
                        "parallel.dp=auto, or leave faults.min_dp at 1.")
    elif config.parallel.dp == "auto" and f.min_dp > dp_of(config):
        problems.append(f"faults.min_dp={f.min_dp} exceeds the {dp_of(config)} replicas "
                        f"cluster.workers={config.cluster.workers} allow. Fix: lower "
                        "faults.min_dp or raise cluster.workers.")
    if f.max_restarts < 0 or f.restart_backoff_s < 0:
        problems.append(f"faults.max_restarts={f.max_restarts} and faults.restart_backoff_s="
                        f"{f.restart_backoff_s} cannot be negative. Fix: use 0 or more.")
    try:
        injections = parse_injections(f.inject)
    except ValueError as error:
        return problems + [str(error)]
    for injection in injections:
        if injection.kind == "lose" and cluster_address(config) is None:
            problems.append(f"faults.inject.{injection.index}: losing a node needs a cluster "
                            "of several nodes, and a local run has one. Fix: set "
                            "cluster.address (or $RAY_ADDRESS), or drill with 'kill rank R "
                            "at step S' instead.")
        if injection.rank >= config.cluster.workers:
            problems.append(f"faults.inject.{injection.index}: rank {injection.rank} does not "
                            f"exist with cluster.workers={config.cluster.workers}. Fix: use a "
                            f"rank below {config.cluster.workers}.")
    return problems


def nearest_divisor(number: int, wanted: int) -> int:
    divisors = [d for d in range(1, number + 1) if number % d == 0]
    return min(divisors, key=lambda d: abs(d - wanted))
