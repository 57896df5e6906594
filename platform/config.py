"""The one typed config tree of a run, its presets and its command-line overrides.

Every knob lives here so that `raytron config` can print exactly what a run will do,
and so that the whole tree can be logged as MLflow params and saved beside the
checkpoints. Validation rules live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

import raytron.configs

EMBEDDED_CORPUS = "embedded:python-reference"


@dataclass
class RunSection:
    name: str = "tiny"  # run directory name and MLflow run name; same name = resume
    root: str = "runs"  # holds run directories and the local MLflow store


@dataclass
class ModelConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: as many as n_heads; fewer: grouped-query attention
    ffn_hidden: int | None = None  # None: 8/3 * d_model rounded up to ffn_multiple_of (Llama)
    ffn_multiple_of: int = 64
    vocab_size: int | None = None  # None: the tokenizer's, padded to vocab_multiple_of
    vocab_multiple_of: int = 64
    max_seq_len: int = "${data.seq_len}"  # type: ignore[assignment]
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline-parallel ranks
    dp: int | str = 1  # data-parallel replicas; auto: cluster.workers / (pp * tp)
    tp: int = 1  # tensor-parallel ranks per pipeline stage, on one node
    dp_shard: str = "full"  # full (FSDP, ZeRO-3) | grad-op (ZeRO-2) | none (DDP)
    sequence_parallel: bool = True  # shard norms and the residual stream over tp
    loss_parallel: bool = True  # loss from vocab-sharded logits, never gathered
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved-1f1b | zero-bubble
    microbatches: int | None = None  # per schedule call; None: a replica's whole batch
    virtual_stages: int = 2  # stages per pipeline rank, for interleaved-1f1b
    layers_per_stage: list[int] | None = None  # uneven split; None: as even as possible


@dataclass
class TrainConfig:
    global_batch: int = 32  # sequences per optimizer step, summed over data-parallel replicas
    micro_batch: int = 8  # sequences per forward/backward on one replica
    steps: int = 300
    lr: float = 1e-3
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 20
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables validation
    peak_flops: float | None = None  # per device, for MFU; None: known GPU table or measured
    activation_checkpointing: int | str = "none"  # none | full | k: recompute every k-th layer


@dataclass
class SourceConfig:
    path: str = EMBEDDED_CORPUS  # file, folder, glob, s3://, gs://, or the embedded reference
    format: str = "auto"  # auto (by extension) | text | jsonl | parquet
    text_field: str = "text"  # JSONL / Parquet field holding the document
    document: str = "file"  # text files: one document per file | per paragraph
    weight: float = 1.0  # share of the training tokens, relative to the other sources
    epochs: int | None = None  # passes over this source; None: repeat it forever


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    validation_sources: list[SourceConfig] = field(default_factory=list)  # else val_share
    tokenizer: str | None = None  # a tokenizer.json; None trains a byte-level BPE on the corpus
    vocab_size: int = 4096  # size of the BPE tokenizer trained when none is given
    tokenizer_sample_mb: int = 200  # corpus bytes the BPE tokenizer is trained on, at most
    seq_len: int = 128
    val_share: float = 0.05  # share of documents held out for validation (by content hash)
    val_sequences: int = 64  # held-out sequences scored at each validation
    tokenizer_workers: int | str = "auto"  # Ray actors tokenizing; auto: the CPUs left free
    prefetch_steps: int = 4  # global batches prepared ahead of training
    max_document_mb: int = 64  # longer records are skipped as `oversized`
    shuffle_window: int = 0  # shuffle training documents within windows of this many; 0: off
    bos: bool = False  # put the tokenizer's BOS before every document (EOS always ends one)


@dataclass
class CheckpointConfig:
    dir: str = "${run.root}/${run.name}/checkpoints"
    interval: int = 100  # steps between checkpoints; one is always written at the end
    keep_last: int = 2
    async_save: bool = False  # write shards in the background; committed at a later step


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<run.root>/mlflow.db
    experiment: str = "raytron"
    run_name: str = "${run.name}"


@dataclass
class ClusterConfig:
    address: str | None = None  # None: $RAY_ADDRESS, else start a local Ray
    workers: int = 1  # one per device; must equal pp * dp * tp
    cpus_per_worker: int = 1  # also the torch threads of each worker
    gpus_per_worker: int | None = None  # None: 1 when the cluster has GPUs, else 0
    num_cpus: int | None = None  # CPUs of a locally started Ray; None: enough for the run
    dashboard: bool = True  # Ray's dashboard (http://127.0.0.1:8265) for a locally started Ray
    device_memory_gb: float | None = None  # refuse layouts whose estimate exceeds it
    worker_resources: dict[str, float] = field(default_factory=dict)  # more Ray resources
    # each worker asks for, e.g. {"trainer": 1} to keep workers on nodes that offer it


@dataclass
class FaultsConfig:
    max_restarts: int = 3  # worker-group restarts from the last checkpoint before the run fails
    restart_backoff_s: float = 2.0  # wait before a restart; doubles each time, at most 60 s
    hang_timeout_s: float = 600.0  # a rank without progress this long is failed (watchdog)
    inject: list[str] = field(default_factory=list)  # drills: "kill rank 1 at step 7", ...
    min_dp: int = 1  # with parallel.dp=auto: the fewest replicas the run goes on with
    schedule_timeout_s: float = 60.0  # wait this long for the largest layout before a smaller
    capacity_check_s: float = 30.0  # while smaller than it could be: look for capacity this often


@dataclass
class RaytronConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)


class ConfigError(ValueError):
    """An invalid config; the message names every bad key and how to fix it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))


DEFAULT_PRESET = "tiny"


def preset_dirs() -> list[Path]:
    """Folders holding the shipped presets (configs/), in an editable or a regular install."""
    return [Path(p) for p in raytron.configs.__path__ if Path(p).is_dir()]


def preset_names() -> list[str]:
    return sorted({p.stem for d in preset_dirs() for p in d.glob("*.yaml")})


def find_config_file(name_or_path: str) -> Path:
    """A YAML path as given, or the name of a shipped preset (`tiny`, `gpt2-124m`...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for folder in preset_dirs():
        candidate = folder / f"{path.stem if path.suffix else name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        [
            f"config '{name_or_path}' is neither a YAML file nor a preset. "
            f"Fix: pass a path to a .yaml file or one of: {', '.join(preset_names())}."
        ]
    )


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None):
    """Merge schema defaults, a preset or YAML file, and `key=value` overrides.

    Returns the resolved `RaytronConfig`; raises `ConfigError` naming the bad key.
    """
    path = find_config_file(name_or_path or DEFAULT_PRESET)
    tree = OmegaConf.structured(RaytronConfig)
    tree.run.name = path.stem  # a file that names its run overrides this below
    try:
        tree = OmegaConf.merge(tree, OmegaConf.load(path))
    except OmegaConfBaseException as error:
        raise ConfigError([describe_omegaconf_error(error, f"in {path}")]) from None
    problems = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override '{item}' is not key=value. Fix: write e.g. train.steps=100.")
            continue
        try:
            OmegaConf.update(tree, key.strip(), yaml.safe_load(value), merge=True)
        except yaml.YAMLError:
            problems.append(f"{key}: cannot parse '{value}'. Fix: quote it, e.g. {key}='...'.")
        except OmegaConfBaseException as error:
            problems.append(describe_omegaconf_error(error, f"in override '{item}'"))
    if problems:
        raise ConfigError(problems)
    try:
        OmegaConf.resolve(tree)
        config = OmegaConf.to_object(tree)
    except OmegaConfBaseException as error:
        raise ConfigError([describe_omegaconf_error(error, "")]) from None
    assert isinstance(config, RaytronConfig)
    return config


def describe_omegaconf_error(error: OmegaConfBaseException, where: str) -> str:
    key = getattr(error, "full_key", None) or "?"
    where = f" ({where})" if where else ""
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        known = known_keys(section)
        return (
            f"{key}: unknown key{where}. Fix: use one of {', '.join(known)} "
            "(`raytron config` prints them all)."
        )
    if isinstance(error, ValidationError):
        return f"{key}: {error.msg}{where}. Fix: give a value of the type `raytron config` shows."
    return f"{key}: {getattr(error, 'msg', str(error))}{where}."


def known_keys(section: str) -> list[str]:
    node: Any = OmegaConf.structured(RaytronConfig)
    for part in [p for p in section.split(".") if p]:
        if part.isdigit():
            node = node[int(part)]
        elif part in node:
            node = node[part]
        else:
            break
    prefix = f"{section}." if section else ""
    return [f"{prefix}{k}" for k in node.keys()] if hasattr(node, "keys") else []


def to_yaml(config: RaytronConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: RaytronConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))  # type: ignore[return-value]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}`; lists get their index as a key."""
    flat: dict[str, Any] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
