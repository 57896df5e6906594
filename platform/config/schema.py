"""The one typed config tree of a run.

Every knob lives here so that `raytron config` can print exactly what a run will do,
and so that the whole tree can be logged as MLflow params and saved beside the
checkpoints. Loading is `load.py`, the rules a config must satisfy `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EMBEDDED_CORPUS = "embedded:python-reference"
AUTO = "auto"  # a value several keys take: derive it (each key's comment says how)


@dataclass
class RunSection:
    name: str = "tiny"  # run directory (one folder name) and MLflow run name; same name = resume
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
    init_from: str | None = None  # start from these weights: a raytron run or checkpoint, or
    # a Hugging Face Llama folder (its shape replaces the keys above; its tokenizer is used)


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
    micro_batch: int = 8  # sequences per forward/backward on one replica; unless you set it,
    # lowered where a pipeline schedule needs more micro-batches than it gives
    steps: int | str = 300  # optimizer steps; auto: as many whole global batches as the
    # sources with an epoch limit give (counted by one pass before training; fine-tuning)
    lr: float = 1e-3
    min_lr: float = 1e-4  # floor of the cosine decay
    warmup_steps: int = 20
    weight_decay: float = 0.1  # on matrices (embeddings included), not on norm gains
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    precision: str = AUTO  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables validation
    peak_flops: float | None = None  # per device, for MFU; None: a known GPU's data sheet, a
    # matmul measured on an unknown GPU, no MFU on a CPU
    activation_checkpointing: int | str = "none"  # none | full | selective | k: recompute every
    # k-th layer; selective: every layer, keeping its matmul outputs
    compile: bool = False  # torch.compile each transformer block (inductor; first steps slower)


@dataclass
class SourceConfig:
    path: str = EMBEDDED_CORPUS  # file, folder, glob, s3://, gs://, or the embedded reference
    format: str = AUTO  # auto (by extension) | text | jsonl | parquet | chat | prompt_completion
    # (chat, prompt_completion: fine-tuning samples in JSONL, or Parquet by its extension)
    text_field: str = "text"  # JSONL / Parquet field holding the document
    messages_field: str = "messages"  # chat: the list of {role, content} turns
    prompt_field: str = "prompt"  # prompt_completion: the prompt (never learned) ...
    completion_field: str = "completion"  # ... and the completion (learned, then EOS)
    document: str = "file"  # text files: one document per file | per paragraph
    weight: float = 1.0  # share of the training tokens, relative to the other sources
    epochs: int | None = None  # passes over this source; None: repeat it forever


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])  # or paths
    validation_sources: list[SourceConfig] = field(default_factory=list)  # else val_share
    tokenizer: str | None = None  # a tokenizer.json; None trains a byte-level BPE on the corpus
    vocab_size: int = 4096  # size of the BPE tokenizer trained when none is given
    tokenizer_sample_mb: int = 200  # corpus bytes the BPE tokenizer is trained on, at most
    seq_len: int = 128
    val_share: float = 0.05  # share of documents held out for validation (by content hash)
    val_sequences: int = 64  # held-out sequences scored at each validation
    tokenizer_workers: int | str = AUTO  # Ray actors tokenizing; auto: the CPUs left free
    cache: str | None = "${run.root}/token_cache"  # tokenized files, kept for every later
    # epoch, restart and run with the same file and tokenizer (a path or URI); null: off
    prefetch_steps: int = 4  # global batches prepared ahead of training
    max_document_mb: int = 64  # longer records are skipped as `oversized`
    shuffle_window: int = 0  # shuffle training documents within windows of this many; 0: off
    bos: bool = False  # put the tokenizer's BOS before every document (EOS always ends one)
    packing: str = AUTO  # stream: documents concatenated and cut (pre-training) | samples:
    # whole samples per sequence, padded (fine-tuning) | auto: samples with chat or
    # prompt_completion sources, else stream
    document_mask: bool = True  # samples: each attends only within itself, positions from 0
    overlong: str = "drop"  # samples longer than seq_len + 1 tokens: drop (counted) | truncate
    on_new_files: str = "error"  # a resumed run's sources list other files than its
    # checkpoint recorded: error | next_epoch (files added are read from the next epoch on)


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
    system_metrics: bool = True  # each worker node's CPU, memory, disk, network (and GPU use
    # with pynvml) in the MLflow run, as system/<host>/...
    system_metrics_interval_s: float = 10.0  # how often each node samples them


@dataclass
class ClusterConfig:
    address: str | None = None  # None: $RAY_ADDRESS, else start a local Ray
    workers: int | None = None  # one per device; None: pp * dp * tp (dp=auto: give it)
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
    checkpoint_timeout_s: float = 1800.0  # ... while it saves a checkpoint
    eval_timeout_s: float = 1800.0  # ... while it runs validation
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

    heading: str | None = None  # what the command line says before the problems, if not
    # its own ("invalid config", "cannot serve", ...)

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))


