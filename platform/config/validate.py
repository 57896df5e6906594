"""Every rule a config must satisfy, checked before any Ray resource is taken.

First each value on its own (type, range, allowed names; every leaf key of the config
has a rule, which `RULES` lists), then the rules between keys (divisibility, layout,
pipeline schedule, paths), then those that need the cluster or the tokenizer. Each
problem names the key, the value and the fix, and all problems are reported at once,
so that a user fixes a config in one round instead of one error per launch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytron.model.parallelize import DP_SHARD_MODES
from raytron.model.pipeline import SCHEDULES
from raytron.pipelines.file_lists import ON_NEW_FILES
from raytron.pipelines.sources import DOCUMENTS, FORMATS, SourceError, list_files
from raytron.platform.config.drills import parse_injection, parse_injections
from raytron.platform.config.layout import Layout
from raytron.platform.config.load import flatten, to_dict
from raytron.platform.config.resolve import (
    OVERLONG,
    PACKINGS,
    PRECISIONS,
    RECOMPUTE_NAMED,
    cluster_address,
    fitting_micro_batch,
    is_int,
    schedule_shortfall,
)
from raytron.platform.config.schema import AUTO, ConfigError, RaytronConfig, SourceConfig

MAX_COUNT = 2**31 - 1  # any count: beyond it, no run is meant
MAX_LAYERS = 4096  # a model beyond these sizes is a typo, and `raytron plan` would
MAX_WIDTH = 2**20  # ... spend minutes building it on the meta device
MAX_VOCABULARY = 2**24
MAX_SEQUENCE = 2**24
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")

Rule = Callable[[str, Any], "str | None"]


def validate(config: RaytronConfig, check_paths: bool = True) -> None:
    """Raise `ConfigError` listing every problem of `config`: the values first; the rules
    between keys only once every value is valid (so that none divides by zero)."""
    problems = value_problems(config)
    if not problems:
        problems = (model_problems(config) + parallel_problems(config)
                    + train_problems(config) + data_problems(config, check_paths)
                    + fault_problems(config))
    raise_problems(problems)


# -- each value on its own ----------------------------------------------------------------

def default_of(key: str) -> Any:
    """The schema's default of a key (list entries: a default source's), for examples."""
    if re.match(r"^data\.(validation_)?sources\.\d+\.", key):
        return getattr(SourceConfig(), key.rsplit(".", 1)[1])
    return DEFAULTS.get(key)


def example(key: str, fallback: Any) -> str:
    value = default_of(key)
    return f"{value:g}" if isinstance(value, float) else str(value if value else fallback)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def count(maximum: int = MAX_COUNT, optional: bool = False) -> Rule:
    """A whole number from 1 to `maximum`."""
    def rule(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not is_int(value) or value < 1:
            unset = " or leave it unset" if optional else ""
            return (f"{key}={value!r} must be a whole number of 1 or more. Fix: set {key} to "
                    f"e.g. {example(key, 1)}{unset}.")
        if value > maximum:
            return (f"{key}={value} is larger than {maximum}, more than any run needs. Fix: "
                    f"use a value up to {maximum} (e.g. {example(key, 1)}).")
        return None
    return rule


def natural(key: str, value: Any) -> str | None:
    """A whole number from 0."""
    if not is_int(value) or not 0 <= value <= MAX_COUNT:
        return f"{key}={value!r} must be a whole number of 0 or more. Fix: use e.g. " \
               f"{example(key, 0)}."
    return None


def number(minimum: float = 0.0, positive: bool = True, below: float | None = None,
           optional: bool = False) -> Rule:
    """A finite number above `minimum` (or from it, unless `positive`), below `below`."""
    def rule(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        low_ok = is_number(value) and (value > minimum if positive else value >= minimum)
        if low_ok and math.isfinite(value) and (below is None or value < below):
            return None
        what = f"more than {minimum:g}" if positive else f"{minimum:g} or more"
        if below is not None:
            what += f" and less than {below:g}"
        unset = " or leave it unset" if optional else ""
        return (f"{key}={value!r} must be a finite number {what}. Fix: use e.g. "
                f"{example(key, 1.0)}{unset}.")
    return rule


def one_of(choices: tuple[str, ...]) -> Rule:
    def rule(key: str, value: Any) -> str | None:
        if value in choices:
            return None
        return f"{key}={value!r} is unknown. Fix: use one of {', '.join(choices)}."
    return rule


def count_or(choices: tuple[str, ...], meaning: str) -> Rule:
    def rule(key: str, value: Any) -> str | None:
        if value in choices or is_int(value) and 1 <= value <= MAX_COUNT:
            return None
        return (f"{key}={value!r} must be a whole number of 1 or more or "
                f"{' or '.join(choices)}. Fix: {meaning}.")
    return rule


def text(optional: bool = False) -> Rule:
    """A non-empty string."""
    def rule(key: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, str) and value.strip() and "\x00" not in value:
            return None
        unset = ", or leave it unset (null)" if optional else ""
        return f"{key}={value!r} must be a non-empty text without NUL characters. Fix: " \
               f"give a value{unset}."
    return rule


def folder_name(key: str, value: Any) -> str | None:
    """A name that becomes one folder: it cannot climb out of its parent."""
    if (isinstance(value, str) and value.strip() and value not in (".", "..")
            and not re.search(r"[/\\\x00-\x1f]", value) and len(value.encode()) <= 200):
        return None
    return (f"{key}={value!r} must be one folder name (no '/', '\\', '..' or control "
            f"characters; at most 200 bytes): it becomes a path under run.root. Fix: use e.g. "
            f"{example(key, 'my-run')}.")


def run_name(key: str, value: Any) -> str | None:
    """A folder name safe anywhere it goes: the run's folder, its MLflow run, the file and
    the command line of a submitted job."""
    if (isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", value)
            and len(value) <= 200):
        return None
    return (f"{key}={value!r} must be one folder name of letters, digits, '.', '_' and '-' "
            "(not starting with '.' or '-'; at most 200 characters): it names the run's "
            f"folder, its MLflow run and a submitted job's files. Fix: use e.g. {key}=my-run.")


def a_list(non_empty: bool = False) -> Rule:
    def rule(key: str, value: Any) -> str | None:
        if isinstance(value, list) and (value or not non_empty):
            return None
        return f"{key} is empty. Fix: give at least one entry, e.g. {key}='[corpus/]'."
    return rule


def optional_list(key: str, value: Any) -> str | None:
    return None if value is None or isinstance(value, list) else f"{key} must be a list."


def drill(key: str, value: Any) -> str | None:
    try:
        parse_injection(int(key.rsplit(".", 1)[1]), value)
    except ValueError as error:
        return str(error)
    return None


def worker_resource(key: str, value: Any) -> str | None:
    name = key.removeprefix("cluster.worker_resources.")
    if name in RAY_BUILTIN_RESOURCES or not name.strip():
        return (f"cluster.worker_resources names '{name}', which raytron sets itself. Fix: "
                "use cluster.cpus_per_worker / cluster.gpus_per_worker, and worker_resources "
                "only for custom resources such as {trainer: 1}.")
    return number()(key, value)


def anything(key: str, value: Any) -> str | None:
    return None


RULES: dict[str, Rule] = {
    "run.name": run_name,
    "run.root": text(),
    "model.n_layers": count(MAX_LAYERS),
    "model.d_model": count(MAX_WIDTH),
    "model.n_heads": count(MAX_WIDTH),
    "model.n_kv_heads": count(MAX_WIDTH, optional=True),
    "model.ffn_hidden": count(4 * MAX_WIDTH, optional=True),
    "model.ffn_multiple_of": count(MAX_WIDTH),
    "model.vocab_size": count(MAX_VOCABULARY, optional=True),
    "model.vocab_multiple_of": count(MAX_WIDTH),
    "model.max_seq_len": count(MAX_SEQUENCE),
    "model.rope_theta": number(),
    "model.norm_eps": number(),
    "model.tie_embeddings": anything,  # a bool: OmegaConf checks the type
    "model.init_std": number(),
    "model.init_from": text(optional=True),
    "parallel.pp": count(MAX_LAYERS),
    "parallel.dp": count_or((AUTO,), "set parallel.dp=auto to use every worker, or e.g. "
                                     "parallel.dp=2"),
    "parallel.tp": count(MAX_WIDTH),
    "parallel.dp_shard": one_of(DP_SHARD_MODES),
    "parallel.sequence_parallel": anything,
    "parallel.loss_parallel": anything,
    "parallel.schedule": one_of(SCHEDULES),
    "parallel.microbatches": count(optional=True),
    "parallel.virtual_stages": count(MAX_LAYERS),
    "parallel.layers_per_stage": optional_list,
    "parallel.layers_per_stage.*": count(MAX_LAYERS),
    "train.global_batch": count(),
    "train.micro_batch": count(),
    "train.steps": count_or((AUTO,), "give a number of steps, or auto to train on every "
                                      "source with an epoch limit to its end"),
    "train.lr": number(),
    "train.min_lr": number(positive=False),
    "train.warmup_steps": natural,
    "train.weight_decay": number(positive=False),
    "train.beta1": number(positive=False, below=1),
    "train.beta2": number(positive=False, below=1),
    "train.grad_clip": number(positive=False),
    "train.precision": one_of(PRECISIONS),
    "train.seed": natural,
    "train.log_interval": count(),
    "train.eval_interval": natural,
    "train.peak_flops": number(optional=True),
    "train.activation_checkpointing": count_or(
        tuple(RECOMPUTE_NAMED), "use none, full, selective, or k >= 1 to recompute every "
                                "k-th layer"),
    "train.compile": anything,  # a bool: OmegaConf checks the type
    "data.sources": a_list(non_empty=True),
    "data.validation_sources": a_list(),
    "data.tokenizer": text(optional=True),
    "data.vocab_size": count(MAX_VOCABULARY),
    "data.tokenizer_sample_mb": count(),
    "data.seq_len": count(MAX_SEQUENCE),
    "data.val_share": number(positive=False, below=1),
    "data.val_sequences": count(),
    "data.tokenizer_workers": count_or((AUTO,), "use e.g. 2, or auto to use the CPUs the "
                                                "training workers leave"),
    "data.cache": text(optional=True),
    "data.prefetch_steps": count(),
    "data.max_document_mb": count(),
    "data.shuffle_window": natural,
    "data.bos": anything,
    "data.packing": one_of(PACKINGS),
    "data.document_mask": anything,
    "data.overlong": one_of(OVERLONG),
    "data.on_new_files": one_of(ON_NEW_FILES),
    "checkpoint.dir": text(),
    "checkpoint.interval": count(),
    "checkpoint.keep_last": count(),
    "checkpoint.async_save": anything,
    "tracking.uri": text(optional=True),
    "tracking.experiment": folder_name,
    "tracking.run_name": text(),
    "tracking.system_metrics": anything,
    "tracking.system_metrics_interval_s": number(minimum=1, positive=False),
    "cluster.address": text(optional=True),
    "cluster.workers": count(optional=True),
    "cluster.cpus_per_worker": count(),
    "cluster.gpus_per_worker": number(positive=False, optional=True),
    "cluster.num_cpus": count(optional=True),
    "cluster.dashboard": anything,
    "cluster.device_memory_gb": number(optional=True),
    "cluster.worker_resources": anything,  # a mapping: its entries have the `.*` rule
    "cluster.worker_resources.*": worker_resource,
    "faults.max_restarts": natural,
    "faults.restart_backoff_s": number(positive=False),
    "faults.hang_timeout_s": number(),
    "faults.checkpoint_timeout_s": number(),
    "faults.eval_timeout_s": number(),
    "faults.inject": a_list(),
    "faults.inject.*": drill,
    "faults.min_dp": count(),
    "faults.schedule_timeout_s": number(),
    "faults.capacity_check_s": number(),
}
for _group in ("sources", "validation_sources"):
    RULES |= {
        f"data.{_group}.*.path": text(),
        f"data.{_group}.*.format": one_of(FORMATS),
        f"data.{_group}.*.text_field": text(),
        f"data.{_group}.*.messages_field": text(),
        f"data.{_group}.*.prompt_field": text(),
        f"data.{_group}.*.completion_field": text(),
        f"data.{_group}.*.document": one_of(DOCUMENTS),
        f"data.{_group}.*.weight": number(),
        f"data.{_group}.*.epochs": count(optional=True),
    }

DEFAULTS = flatten(to_dict(RaytronConfig()))


def rule_key(key: str) -> str:
    """The `RULES` key of a leaf: list indices and mapping names become `*`."""
    if key.startswith("cluster.worker_resources."):
        return "cluster.worker_resources.*"
    return re.sub(r"\.\d+(?=\.|$)", ".*", key)


def value_problems(config: RaytronConfig) -> list[str]:
    problems = []
    for key, rule in RULES.items():
        if "*" not in key:
            problems.append(rule(key, lookup(config, key)))
    for key, value in flatten(to_dict(config)).items():
        pattern = rule_key(key)
        if "*" in pattern:
            problems.append(RULES[pattern](key, value))
    return [p for p in problems if p]


def lookup(config: RaytronConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


# -- rules between keys ---------------------------------------------------------------------

def model_problems(config: RaytronConfig) -> list[str]:
    m, tp, problems = config.model, config.parallel.tp, []
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
                f"Fix: set cluster.workers to a multiple of parallel.pp*tp = {replica}."]
    if p.dp == AUTO and c.workers % replica:
        problems.append(
            f"parallel.dp=auto: cluster.workers={c.workers} is not a multiple of parallel.pp*tp "
            f"= {replica}. Fix: use a multiple of {replica} workers."
        )
    elif p.dp != AUTO and layout.world != c.workers:
        problems.append(
            f"parallel.pp*dp*tp = {p.pp}*{p.dp}*{p.tp} = {layout.world} differs from "
            f"cluster.workers={c.workers}. Fix: leave cluster.workers unset (it follows the "
            "layout), change the layout, or set parallel.dp=auto."
        )
    if p.tp > 1:
        problems += tensor_parallel_problems(config)
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
    f, problems = config.faults, []
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
        "raise parallel.tp or parallel.pp, shard with parallel.dp_shard=full, recompute "
        "with train.activation_checkpointing=full, or lower train.micro_batch "
        "(`raytron plan` shows where the memory goes)."
    ]


# -- rules that need the cluster or the tokenizer -------------------------------------------

def placement_problems(config: RaytronConfig, nodes: list[dict[str, float]],
                       gpus: float) -> list[str]:
    """A tensor-parallel group all-reduces in every layer and must sit on one node."""
    kind, need = ("GPU", gpus) if gpus else ("CPU", config.cluster.cpus_per_worker)
    largest = max((int(node.get(kind, 0) // need) for node in nodes), default=0)
    tp = config.parallel.tp
    if tp <= largest:
        return []
    return [
        f"parallel.tp={tp} is larger than the {largest} workers the largest node can host "
        f"({kind} per worker: {need:g}); a tensor-parallel group must share a node. Fix: "
        f"lower parallel.tp to {max(1, largest)} or less and raise parallel.pp or dp "
        "instead, or use nodes with more devices."
    ]


def tokenizer_problems(config: RaytronConfig, tokenizer_vocab: int) -> list[str]:
    """The model must have a row for every token (chat sources add the turn markers)."""
    size = config.model.vocab_size
    if size is None or size >= tokenizer_vocab:
        return []
    if config.model.init_from:
        return [f"model.init_from={config.model.init_from} has {size} token embeddings, fewer "
                f"than the tokenizer's {tokenizer_vocab} tokens (chat sources add "
                "<|im_start|> and <|im_end|> when it lacks them). Fix: use prompt_completion "
                "sources, or a model whose tokenizer has these tokens (raytron's own do)."]
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
