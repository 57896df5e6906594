"""Every rule a config must satisfy, checked before any Ray resource is taken.

First each value on its own (type, range, allowed names: the rule each key is declared
with in `schema.py`), then the rules between keys (divisibility, layout, pipeline
schedule, paths), then those that need the cluster or the tokenizer. Each problem names
the key, the value and the fix, and all problems are reported at once, so that a user
fixes a config in one round instead of one error per launch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from raytron.pipelines.sources import PREFERENCE, SourceError, list_files, sample_kind
from raytron.platform.config.drills import parse_injections
from raytron.platform.config.keys import rule_of, schema_keys
from raytron.platform.config.layout import Layout
from raytron.platform.config.load import flatten, to_dict
from raytron.platform.config.resolve import (
    cluster_address,
    fitting_micro_batch,
    schedule_shortfall,
)
from raytron.platform.config.schema import AUTO, REPLICAS, ConfigError, RaytronConfig


def validate(config: RaytronConfig, check_paths: bool = True) -> None:
    """Raise `ConfigError` listing every problem of `config`: the values first; the rules
    between keys only once every value is valid (so that none divides by zero)."""
    problems = value_problems(config)
    if not problems:
        problems = (model_problems(config) + parallel_problems(config)
                    + train_problems(config) + preference_problems(config)
                    + data_problems(config, check_paths)
                    + fault_problems(config))
    raise_problems(problems)


# -- each value on its own ----------------------------------------------------------------

def value_problems(config: RaytronConfig) -> list[str]:
    """Each key's value by its rule, in the schema's order; then each value of its lists
    and mappings (`data.sources.0.path`, `faults.inject.1`) by theirs."""
    rules = {key: declared.rule for key, declared in schema_keys()}
    problems = [rule(key, lookup(config, key)) for key, rule in rules.items() if rule]
    for key, value in flatten(to_dict(config)).items():
        rule = None if key in rules else rule_of(key)
        if rule:
            problems.append(rule(key, value))
    return [p for p in problems if p]


def lookup(config: RaytronConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


# -- rules between keys ---------------------------------------------------------------------

def model_problems(config: RaytronConfig) -> list[str]:
    m, tp, problems = config.model, config.parallel.tp, []
    if m.head_dim is None and m.d_model % m.n_heads:
        problems.append(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}. "
            "Fix: pick n_heads among the divisors of d_model "
            f"(e.g. {nearest_divisor(m.d_model, m.n_heads)}), or set model.head_dim."
        )
    elif (m.head_dim or m.d_model // m.n_heads) % 2:
        problems.append(
            f"the head size {m.head_dim or m.d_model // m.n_heads} is odd; rotary embeddings "
            "need an even head size. Fix: change model.head_dim, or model.n_heads or "
            "model.d_model."
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
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        problems.append(
            f"model.rope_high_freq_factor={m.rope_high_freq_factor} is not above "
            f"model.rope_low_freq_factor={m.rope_low_freq_factor}; llama3 scaling interpolates "
            "between them. Fix: e.g. 4.0 and 1.0 (Llama 3.1's).")
    if m.max_seq_len < config.data.seq_len:
        problems.append(f"model.max_seq_len={m.max_seq_len} is shorter than data.seq_len="
                        f"{config.data.seq_len}. Fix: leave model.max_seq_len unset (it follows "
                        "data.seq_len) or raise it.")
    return problems


def parallel_problems(config: RaytronConfig) -> list[str]:
    p, c, m = config.parallel, config.cluster, config.model
    layout, problems = Layout.of(config), []
    replica = layout.replica_size
    if c.workers is None:  # only dp=auto leaves it unset
        return [f"parallel.dp=auto needs cluster.workers, the most workers the run may use. "
                f"Fix: set cluster.workers to a multiple of parallel.pp*cp*tp = {replica}."]
    if p.dp == AUTO and c.workers % replica:
        problems.append(
            f"parallel.dp=auto: cluster.workers={c.workers} is not a multiple of "
            f"parallel.pp*cp*tp = {replica}. Fix: use a multiple of {replica} workers."
        )
    elif p.dp != AUTO and layout.world != c.workers:
        problems.append(
            f"parallel.pp*dp*cp*tp = {p.pp}*{p.dp}*{p.cp}*{p.tp} = {layout.world} differs from "
            f"cluster.workers={c.workers}. Fix: leave cluster.workers unset (it follows the "
            "layout), change the layout, or set parallel.dp=auto."
        )
    if p.tp > 1:
        problems += tensor_parallel_problems(config)
    if p.cp > 1:
        problems += context_parallel_problems(config)
    if p.pp > 1:
        problems += pipeline_problems(config)
    else:
        for key in ("layers_per_stage", "microbatches"):
            if getattr(p, key) is not None:
                problems.append(f"parallel.{key}={getattr(p, key)} applies only to pipelines. "
                                f"Fix: leave it unset, or set parallel.pp to 2 or more.")
    if m.n_layers < layout.stages:
        problems.append(
            f"model.n_layers={m.n_layers} is fewer than the {layout.stages} pipeline "
            f"stages of parallel.pp={p.pp}. Fix: lower parallel.pp (or parallel.virtual_stages)."
        )
    return problems


def tensor_parallel_problems(config: RaytronConfig) -> list[str]:
    m, tp, problems = config.model, config.parallel.tp, []
    if config.train.compile:
        problems.append(f"train.compile=true with parallel.tp={tp}: on torch 2.13 the backward "
                        "of a compiled tensor-parallel block fails inside DTensor, and with "
                        "FSDP besides it trains other losses than eager (measured). Fix: set "
                        "train.compile=false, or parallel.tp=1 (compile works with dp and pp).")
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


def context_parallel_problems(config: RaytronConfig) -> list[str]:
    p, seq_len, problems = config.parallel, config.data.seq_len, []
    if seq_len % (2 * p.cp):
        problems.append(f"data.seq_len={seq_len} does not split into 2 x parallel.cp={p.cp} "
                        "equal chunks (each context-parallel rank holds one chunk from the "
                        f"start and one from the end). Fix: use a multiple of {2 * p.cp}.")
    elif p.tp > 1 and p.sequence_parallel and seq_len // p.cp % p.tp:
        problems.append(f"data.seq_len={seq_len} / parallel.cp={p.cp} = {seq_len // p.cp} "
                        f"tokens per rank is not divisible by parallel.tp={p.tp}, which "
                        f"sequence parallelism splits them over. Fix: use a multiple of "
                        f"{2 * p.cp * p.tp}, or parallel.sequence_parallel=false.")
    if config.train.compile:
        problems.append(f"train.compile=true with parallel.cp={p.cp}: ring attention passes "
                        "key/value blocks between ranks inside each layer, which torch.compile "
                        "does not trace. Fix: set train.compile=false, or parallel.cp=1.")
    return problems


def pipeline_problems(config: RaytronConfig) -> list[str]:
    p, t, problems = config.parallel, config.train, []
    layout = Layout.of(config)
    replica = t.global_batch // layout.dp
    shortfall = schedule_shortfall(config, replica // t.micro_batch) \
        if replica and replica % t.micro_batch == 0 else None
    if shortfall:
        fitting = fitting_micro_batch(config)
        fix = (f"set train.micro_batch={fitting}" if fitting
               else "raise train.global_batch, or lower parallel.pp")
        problems.append(f"{shortfall}. Fix: {fix} (or change parallel.microbatches).")
    if p.pp > 1 and p.schedule == "zero-bubble" and p.dp_shard == "full" \
            and layout.shard_degree > 1:
        problems.append(f"parallel.schedule=zero-bubble with parallel.dp_shard=full over "
                        f"{layout.shard_degree} ranks (dp x cp): the schedule computes weight "
                        "gradients in a pass of their own after the input gradients, which "
                        "needs each block's gathered weights kept from its forward to that "
                        "pass, and full sharding frees them after the forward. Fix: set "
                        "parallel.dp_shard=grad-op (ZeRO-2) or none (DDP), or use another "
                        "parallel.schedule.")
    if p.schedule == "interleaved-1f1b" and p.virtual_stages < 2:
        problems.append("interleaved-1f1b needs parallel.virtual_stages >= 2. Fix: set "
                        "parallel.virtual_stages=2, or use parallel.schedule=1f1b.")
    if p.layers_per_stage is not None and (
        len(p.layers_per_stage) != layout.stages
        or sum(p.layers_per_stage) != config.model.n_layers
    ):
        problems.append(
            f"parallel.layers_per_stage={list(p.layers_per_stage)} must list "
            f"{layout.stages} positive counts (one per stage) summing to model.n_layers="
            f"{config.model.n_layers}. Fix: correct it, or leave it unset for an even split."
        )
    return problems


def train_problems(config: RaytronConfig) -> list[str]:
    t, dp, problems = config.train, Layout.of(config).dp, []
    if config.faults.mode == REPLICAS:  # replicas split a step by whole micro-batches,
        dp = 1  # unevenly where they must (`replica_problems`)
    if t.global_batch % (t.micro_batch * dp):
        step = t.micro_batch * dp
        problems.append(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch * "
            f"parallel.dp = {t.micro_batch}*{dp} = {step}. Fix: set train.global_batch to a "
            f"multiple of {step} (e.g. {max(step, round(t.global_batch / step) * step)})."
        )
    if t.steps == AUTO and not any(s.epochs for s in config.data.sources):
        problems.append(
            "train.steps=auto trains until every source with an epoch limit is read to its "
            "end, and no source of data.sources has one. Fix: give a source epochs (e.g. "
            "data.sources.0.epochs=1), or give train.steps a number.")
    if t.min_lr > t.lr:
        problems.append(
            f"train.min_lr={t.min_lr} must not exceed train.lr={t.lr}. "
            f"Fix: set train.min_lr to e.g. {t.lr / 10:g}."
        )
    return problems


def preference_problems(config: RaytronConfig) -> list[str]:
    """DPO trains on preference pairs and on nothing else; a pair's two rows stay in one
    micro-batch; the reference model is the base under the adapters."""
    t, d = config.train, config.data
    dpo, problems = t.objective == "dpo", []
    for group in ("sources", "validation_sources"):
        for index, source in enumerate(getattr(d, group)):
            pairs = sample_kind(source.path, source.format) == PREFERENCE
            if dpo and not pairs:
                problems.append(
                    f"data.{group}.{index} (format {source.format}) holds no preference "
                    "pairs, and train.objective=dpo trains on pairs only. Fix: set "
                    f"data.{group}.{index}.format=preference for a source of prompt, chosen "
                    "and rejected fields, or leave the source out.")
            elif pairs and not dpo:
                problems.append(
                    f"data.{group}.{index} holds preference pairs, which only "
                    "train.objective=dpo learns from. Fix: set train.objective=dpo, or use "
                    "a chat or prompt_completion source for supervised fine-tuning.")
    if not dpo:
        return problems
    if t.micro_batch % 2:
        problems.append(
            f"train.micro_batch={t.micro_batch} is odd, and with train.objective=dpo a "
            "micro-batch holds whole pairs (a chosen and a rejected row each). Fix: set "
            f"train.micro_batch={t.micro_batch + 1} (or {max(t.micro_batch - 1, 2)}).")
    if d.packing == "stream":
        problems.append("data.packing=stream cuts samples apart, and DPO scores whole "
                        "completions. Fix: set data.packing=auto (or samples).")
    if t.lora.rank and t.lora.train_embeddings:
        problems.append(
            "train.lora.train_embeddings=true with train.objective=dpo: the embeddings "
            "would train, and the reference (the base with the adapters off) would move "
            "with them. Fix: set train.lora.train_embeddings=false.")
    return problems


def data_problems(config: RaytronConfig, check_paths: bool) -> list[str]:
    d, problems = config.data, []
    if d.tokenizer is None and d.vocab_size < 512:
        problems.append(
            f"data.vocab_size={d.vocab_size} is too small for a byte-level BPE tokenizer "
            "(256 byte tokens come first). Fix: use 512 or more."
        )
    if not check_paths:
        return problems
    for group in ("sources", "validation_sources"):
        for index, source in enumerate(getattr(d, group)):
            try:
                list_files(source.path)
            except SourceError as error:
                problems.append(f"data.{group}.{index}.path: {error}")
    if d.tokenizer is not None and not is_file(d.tokenizer):
        problems.append(
            f"data.tokenizer='{d.tokenizer}' is not a file. Fix: give the path of a "
            "tokenizer.json, or leave it unset to train one on the corpus."
        )
    elif d.tokenizer is not None:
        problems += tokenizer_file_problems(d.tokenizer, d.bos)
    return problems


def tokenizer_file_problems(path: str, bos: bool) -> list[str]:
    """A given tokenizer must load, end documents with an EOS, and have a BOS if asked."""
    from raytron.pipelines.tokenizer import bos_id, eos_id, load

    try:
        tokenizer = load(path)
    except Exception as error:  # tokenizers raises its own exception type
        return [f"data.tokenizer='{path}' is not a Hugging Face tokenizer.json ({error}). "
                "Fix: give a tokenizer.json (`raytron tokenizer train` writes one), or leave "
                "it unset to train one on the corpus."]
    try:
        eos_id(tokenizer)
        if bos:
            bos_id(tokenizer)
    except ValueError as error:
        return [f"data.tokenizer='{path}': {str(error).rstrip('.')}."]
    return []


def is_file(path: str) -> bool:
    try:
        return Path(path).expanduser().is_file()
    except (OSError, ValueError):
        return False


def fault_problems(config: RaytronConfig) -> list[str]:
    f = config.faults
    problems = replica_problems(config) if f.mode == REPLICAS else []
    if f.min_dp > 1 and config.parallel.dp != AUTO:
        problems.append(f"faults.min_dp={f.min_dp} applies only to elastic runs. Fix: set "
                        "parallel.dp=auto, or leave faults.min_dp at 1.")
    elif config.parallel.dp == AUTO and f.min_dp > Layout.of(config).dp:
        problems.append(f"faults.min_dp={f.min_dp} exceeds the {Layout.of(config).dp} replicas "
                        f"cluster.workers={config.cluster.workers} allow. Fix: lower "
                        "faults.min_dp or raise cluster.workers.")
    for injection in parse_injections(f.inject):
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


def replica_problems(config: RaytronConfig) -> list[str]:
    """faults.mode=replicas: each worker is a whole replica (pp, tp, cp of 1), healed
    from the in-memory snapshots; with dp=auto, up to cluster.workers of them."""
    p, t, problems = config.parallel, config.train, []
    dp = Layout.of(config).dp
    replicas = f"parallel.dp={dp}" if p.dp != AUTO else \
        f"cluster.workers={config.cluster.workers} (parallel.dp=auto)"
    split = [f"parallel.{name}={getattr(p, name)}" for name in ("pp", "tp", "cp")
             if getattr(p, name) > 1]
    if split:
        problems.append(f"faults.mode=replicas with {', '.join(split)}: a replica is one "
                        "worker holding the whole model. Fix: set parallel.pp, parallel.tp "
                        "and parallel.cp to 1, or use faults.mode=restart.")
    if t.global_batch // t.micro_batch < dp:
        fitting = max(d for d in range(1, max(1, t.global_batch // dp) + 1)
                      if t.global_batch % d == 0)
        problems.append(f"faults.mode=replicas: train.global_batch={t.global_batch} makes "
                        f"{t.global_batch // t.micro_batch} micro-batches of "
                        f"train.micro_batch={t.micro_batch}, fewer than the {dp} replicas "
                        f"of {replicas}, which take one each at least. Fix: set "
                        f"train.micro_batch={fitting} (or less, dividing the batch).")
    if config.checkpoint.memory_interval not in (1, AUTO):
        problems.append(f"faults.mode=replicas with checkpoint.memory_interval="
                        f"{config.checkpoint.memory_interval}: a replacement loads the last "
                        "finished step's snapshot. Fix: leave checkpoint.memory_interval at "
                        "auto (or 1).")
    if t.objective == "dpo" and not t.lora.rank:
        problems.append("faults.mode=replicas with a full DPO fine-tune: its reference pass "
                        "before the first step runs in restart mode only. Fix: use "
                        "faults.mode=restart, or train.lora.rank for LoRA DPO.")
    return problems


def memory_problems(config: RaytronConfig) -> list[str]:
    """With cluster.device_memory_gb: the layout's busiest device must fit in it."""
    if config.cluster.device_memory_gb is None:
        return []
    from raytron.model.estimates import GB
    from raytron.platform.config.plan import make_plan

    plan = make_plan(resolve_layout(config))
    if plan.fits():
        return []
    busiest = plan.busiest
    return [
        f"cluster.device_memory_gb={config.cluster.device_memory_gb:g}: pipeline rank "
        f"{busiest.pp_rank} needs about {busiest.memory.total / GB:.1f} GB per device. Fix: "
        "raise parallel.tp or parallel.pp (or parallel.cp for long sequences), shard with "
        "parallel.dp_shard=full, recompute with train.activation_checkpointing=full, or "
        "lower train.micro_batch (`raytron plan` shows where the memory goes, and which "
        "parallel.cp would fit)."
    ]


# -- rules that need the cluster or the tokenizer -------------------------------------------

def snapshot_problems(config: RaytronConfig, nodes: list[dict[str, float]],
                      gpus: float) -> list[str]:
    """A checkpoint.memory_interval set to a number whose snapshots the nodes' memory
    cannot hold (auto turns them off instead: `control/supervisor.py`; but replica mode
    needs them)."""
    interval = config.checkpoint.memory_interval
    if interval == 0 or interval == AUTO and config.faults.mode != REPLICAS:
        return []
    from raytron.platform.config.plan import make_plan
    from raytron.platform.config.snapshot_room import snapshots_unfit

    unfit = snapshots_unfit(make_plan(resolve_layout(config)), gpus, nodes)
    if unfit is None:
        return []
    if config.faults.mode == REPLICAS:
        return [f"faults.mode=replicas: the in-memory snapshots a replacement loads do not "
                f"fit: {unfit}. Fix: use faults.mode=restart, or give the nodes more memory."]
    return [f"checkpoint.memory_interval={interval}: the in-memory snapshots do not fit: "
            f"{unfit}. Fix: set checkpoint.memory_interval=auto (snapshots only where they "
            "fit) or 0 (restarts start from the last committed checkpoint), or give the "
            "nodes more memory."]


def worker_request(config: RaytronConfig, gpus: float) -> dict[str, float]:
    """The Ray resources one training worker asks for, all on one node."""
    c = config.cluster
    return {"CPU": c.cpus_per_worker, **({"GPU": gpus} if gpus else {}), **c.worker_resources}


def request_key(resource: str) -> str:
    """The config key that sets how much of `resource` a worker asks for."""
    return {"CPU": "cluster.cpus_per_worker", "GPU": "cluster.gpus_per_worker"}.get(
        resource, f"cluster.worker_resources.{resource}")


def amount_of(resource: str, amount: float) -> str:
    """`8 CPUs`, `1 GPU`, `2 'trainer'`."""
    if resource not in ("CPU", "GPU"):
        return f"{amount:g} '{resource}'"
    return f"{amount:g} {resource if 0 < amount <= 1 else plural(resource)}"


def plural(resource: str) -> str:
    return f"{resource}s" if resource in ("CPU", "GPU") else f"'{resource}'"


def workers_on(node: dict[str, float], request: dict[str, float]) -> int:
    """How many workers asking for `request` fit on `node` (with slack for fractions:
    1 / 0.1 is 9.999...)."""
    return min(math.floor(node.get(name, 0) / amount + 1e-6) for name, amount in request.items())


def placement_problems(config: RaytronConfig, nodes: list[dict[str, float]],
                       gpus: float) -> list[str]:
    """A worker takes all it asks for from one node, and a tensor-parallel group (it
    all-reduces in every layer) must share one: some node must hold parallel.tp workers,
    by every resource they ask for, or they wait for a node forever."""
    request = worker_request(config, gpus)
    largest, node = max(((workers_on(n, request), n) for n in nodes), default=(0, {}),
                        key=lambda hosted: hosted[0])
    tp = config.parallel.tp
    if tp <= largest:
        return []
    if largest == 0:
        return unhostable(config, request, nodes)
    scarce = min(request, key=lambda name: node.get(name, 0) / request[name])
    return [
        f"parallel.tp={tp} is larger than the {largest} workers the largest node can host "
        f"(its {amount_of(scarce, node[scarce])} at {request_key(scarce)}="
        f"{request[scarce]:g}); a tensor-parallel group must share a node. Fix: lower "
        f"parallel.tp to {largest} or less and raise parallel.pp or dp instead, lower "
        f"{request_key(scarce)}, or use nodes with more {plural(scarce)}."
    ]


def unhostable(config: RaytronConfig, request: dict[str, float],
               nodes: list[dict[str, float]]) -> list[str]:
    """Why no node can host a single worker: each resource no node has enough of, or,
    when each is somewhere, that no node has all of them."""
    problems = []
    for name, amount in request.items():
        most = max((n.get(name, 0) for n in nodes), default=0)
        if most < amount:
            problems.append(f"{request_key(name)}={amount:g}: no node has "
                            f"{amount_of(name, amount)} (the most one has is {most:g}). Fix: "
                            f"{shortage_fix(config, name, most)}.")
    if problems:
        return problems
    asked = ", ".join(amount_of(name, amount) for name, amount in request.items())
    offered = "; ".join(sorted({", ".join(amount_of(name, n.get(name, 0)) for name in request)
                                for n in nodes})[:3])
    keys = ", ".join(request_key(name) for name in request)
    return [f"no node has all a worker asks for at once ({asked}; the nodes have: {offered}). "
            f"Fix: lower one of {keys}, or use nodes that have all of it."]


def shortage_fix(config: RaytronConfig, resource: str, most: float) -> str:
    key = request_key(resource)
    if resource == "GPU" and most == 0:
        return f"set {key}=0 to train on CPUs, or use a cluster with GPU nodes"
    if resource == "CPU" and cluster_address(config) is None:  # the local Ray's CPUs
        return f"lower {key} to {most:g} or less, or raise cluster.num_cpus"
    if resource in ("CPU", "GPU"):
        return f"lower {key} to {most:g} or less, or use nodes with more {plural(resource)}"
    return (f"declare it on the nodes meant for workers (`ray start --resources="
            f"'{{\"{resource}\": N}}'`; a local run's Ray declares none), or remove it"
            + (f", or lower it to {most:g} or less" if most else ""))


def tokenizer_problems(config: RaytronConfig, tokenizer_vocab: int) -> list[str]:
    """The model must have a row for every token (one from model.init_from grows instead:
    `initial.with_room_for`)."""
    size = config.model.vocab_size
    if size is None or size >= tokenizer_vocab:
        return []
    return [f"model.vocab_size={size} is smaller than the tokenizer's {tokenizer_vocab} tokens. "
            f"Fix: leave model.vocab_size unset or raise it to {tokenizer_vocab} or more."]


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def resolve_layout(config: RaytronConfig) -> RaytronConfig:
    """`parallel.dp=auto` replaced by the replicas cluster.workers allow (after `validate`)."""
    p = config.parallel
    if p.dp != AUTO:
        return config
    return dataclasses.replace(config, parallel=dataclasses.replace(p, dp=Layout.of(config).dp))


def nearest_divisor(number: int, wanted: int) -> int:
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    divisors = small + [number // d for d in small]
    return min(divisors, key=lambda d: abs(d - wanted))
