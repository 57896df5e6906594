"""The one typed config tree of a run.

Every knob lives here so that `raytron config` can print exactly what a run will do,
and so that the whole tree can be logged as MLflow params and saved beside the
checkpoints. Each key is declared once, with its default, the rule its value must satisfy
and what a resumed run does with a new value (`rules.key`: applied, refused, free; a
section or list may declare it for all its keys). Loading is `load.py`, the rules between
keys `validate.py`, the resume kinds `resume.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from raytron.model.families import DEFAULT_FAMILY, FAMILIES
from raytron.model.spec import DP_SHARD_MODES, ROPE_SCALINGS
from raytron.model.spec import TARGETS as LORA_TARGETS
from raytron.model.stages import SCHEDULES
from raytron.pipelines.file_lists import ON_NEW_FILES
from raytron.pipelines.sources import DOCUMENTS, FORMATS
from raytron.platform.config.rules import (
    APPLIED,
    FREE,
    MAX_LAYERS,
    MAX_SEQUENCE,
    MAX_VOCABULARY,
    MAX_WIDTH,
    a_list,
    anything,
    count,
    count_or,
    drill,
    folder_name,
    key,
    natural,
    natural_or_none,
    number,
    one_of,
    optional_list,
    refused,
    run_name,
    section,
    text,
    worker_resource,
)

EMBEDDED_CORPUS = "embedded:python-reference"
AUTO = "auto"  # a value several keys take: derive it (each key's comment says how)
# train.activation_checkpointing, besides k >= 1: which blocks are recomputed (every k-th)
RECOMPUTE_NAMED = {"none": 0, "full": 1, "selective": 1}
PRECISIONS = (AUTO, "bf16", "fp32")  # train.precision; auto: bf16 on GPUs, fp32 on CPUs
PACKINGS = (AUTO, "stream", "samples")  # data.packing
OVERLONG = ("drop", "truncate")  # data.overlong
OBJECTIVES = ("lm", "dpo")  # train.objective
DPO_LOSSES = ("sigmoid", "ipo")  # train.dpo.loss
CHATML = "chatml"
CHAT_TEMPLATES = (AUTO, CHATML)  # data.chat_template
REPLICAS = "replicas"
FAULT_MODES = ("restart", REPLICAS)  # faults.mode
SAME_TOKENIZER = "the run keeps the tokenizer it started with"


@dataclass
class RunSection:
    # run directory (one folder name) and MLflow run name; same name = resume
    name: str = key("tiny", run_name, FREE)
    # holds run directories and the local MLflow store
    root: str = key("runs", text(), FREE)


@dataclass
class ModelConfig:  # every key refused on resume (RaytronConfig.model)
    n_layers: int = key(4, count(MAX_LAYERS))
    d_model: int = key(128, count(MAX_WIDTH))
    n_heads: int = key(4, count(MAX_WIDTH))
    # None: as many as n_heads; fewer: grouped-query attention
    n_kv_heads: int | None = key(None, count(MAX_WIDTH, optional=True))
    # None: 8/3 * d_model rounded up to ffn_multiple_of (Llama)
    ffn_hidden: int | None = key(None, count(4 * MAX_WIDTH, optional=True))
    ffn_multiple_of: int = key(64, count(MAX_WIDTH))
    # None: the tokenizer's, padded to vocab_multiple_of
    vocab_size: int | None = key(None, count(MAX_VOCABULARY, optional=True))
    vocab_multiple_of: int = key(64, count(MAX_WIDTH))
    max_seq_len: int = key("${data.seq_len}", count(MAX_SEQUENCE))
    rope_theta: float = key(10000.0, number())
    norm_eps: float = key(1e-5, number())
    tie_embeddings: bool = key(True, anything)
    init_std: float = key(0.02, number())
    # the Hugging Face family it computes and exports as: llama | mistral | qwen2 (biases
    # on q, k, v) | qwen3 (a norm on each head's query and key)
    family: str = key(DEFAULT_FAMILY, one_of(tuple(FAMILIES)))
    # None: d_model / n_heads
    head_dim: int | None = key(None, count(MAX_WIDTH, optional=True))
    # none | linear | llama3 | yarn: longer contexts than pre-training saw
    rope_scaling: str = key("none", one_of(ROPE_SCALINGS))
    # the context's growth (linear, llama3, yarn)
    rope_factor: float = key(1.0, number())
    # the pre-trained context (llama3, yarn)
    rope_original_max_seq_len: int = key("${model.max_seq_len}", count(MAX_SEQUENCE))
    # llama3: wavelengths longer than context / low are slowed by the factor...
    rope_low_freq_factor: float = key(1.0, number())
    # ... those shorter than context / high kept, those between interpolated
    rope_high_freq_factor: float = key(4.0, number())
    # yarn: dimensions turning more than beta_fast times over the context are kept...
    rope_beta_fast: float = key(32.0, number())
    # ... those turning fewer than beta_slow times interpolated
    rope_beta_slow: float = key(1.0, number())
    # yarn: the factor on cos and sin; None: 0.1 ln(rope_factor) + 1
    rope_attention_factor: float | None = key(None, number(optional=True))
    # start from these weights: a raytron run or checkpoint, a Hugging Face folder, or a
    # Hub id in the local Hugging Face cache (its shape replaces the keys above; its
    # tokenizer is used)
    init_from: str | None = key(None, text(optional=True))


@dataclass
class ParallelConfig:
    # pipeline-parallel ranks
    pp: int = key(1, count(MAX_LAYERS), FREE)
    # data-parallel replicas; auto: cluster.workers / (pp * cp * tp)
    dp: int | str = key(1, count_or((AUTO,), "set parallel.dp=auto to use every worker, or "
                                             "e.g. parallel.dp=2"), FREE)
    # tensor-parallel ranks per pipeline stage, on one node
    tp: int = key(1, count(MAX_WIDTH), FREE)
    # context-parallel ranks: each sequence split over them, attention by ring
    cp: int = key(1, count(MAX_WIDTH), FREE)
    # full (FSDP, ZeRO-3) | grad-op (ZeRO-2) | none (DDP)
    dp_shard: str = key("full", one_of(DP_SHARD_MODES), FREE)
    # shard norms and the residual stream over tp
    sequence_parallel: bool = key(True, anything, FREE)
    # loss from vocab-sharded logits, never gathered
    loss_parallel: bool = key(True, anything, FREE)
    # gpipe | 1f1b | interleaved-1f1b | zero-bubble
    schedule: str = key("1f1b", one_of(SCHEDULES), FREE)
    # per schedule call; None: a replica's whole batch
    microbatches: int | None = key(None, count(optional=True), FREE)
    # stages per pipeline rank, for interleaved-1f1b
    virtual_stages: int = key(2, count(MAX_LAYERS), FREE)
    # uneven split; None: as even as possible
    layers_per_stage: list[int] | None = key(None, optional_list, FREE,
                                             entries=count(MAX_LAYERS))


@dataclass
class LoraConfig:  # every key refused on resume (TrainConfig.lora)
    # rank of each adapter's update; 0: no adapters (every weight trains). With a rank,
    # the model's weights stay frozen and only the adapters train
    rank: int = key(0, natural)
    # the update is scaled by alpha / rank (PEFT's lora_alpha)
    alpha: float = key(16.0, number())
    # dropout on an adapter's input while training (PEFT's lora_dropout)
    dropout: float = key(0.0, number(positive=False, below=1))
    # the projections of each block that get an adapter: q, k, v, o, gate, up, down
    targets: list[str] = key(list(LORA_TARGETS), a_list(non_empty=True),
                             entries=one_of(tuple(LORA_TARGETS)))
    # train the token embeddings and the head whole as well (PEFT's modules_to_save):
    # for chat templates whose tokens the base never learned (e.g. a pre-trained model
    # that never saw <|im_start|>), at the cost of their gradients and optimizer state
    train_embeddings: bool = key(False, anything)


@dataclass
class DpoConfig:
    # how far the model may move from the reference (TRL's beta): the rewards are beta
    # times the log-probability ratios; lower lets the model drift further
    beta: float = key(0.1, number(), APPLIED)
    # sigmoid: the DPO paper's -log sigmoid(beta * margin) | ipo: IPO's squared loss on
    # log-ratios averaged over each completion's tokens (TRL's loss_type)
    loss: str = key("sigmoid", one_of(DPO_LOSSES), APPLIED)


@dataclass
class TrainConfig:
    # sequences per optimizer step, summed over data-parallel replicas
    global_batch: int = key(32, count(), APPLIED)
    # sequences per forward/backward on one replica; unless you set it, lowered where a
    # pipeline schedule needs more micro-batches than it gives
    micro_batch: int = key(8, count(), FREE)
    # optimizer steps; auto: as many whole global batches as the sources with an epoch limit
    # give (counted by one pass before training; fine-tuning)
    steps: int | str = key(300, count_or((AUTO,), "give a number of steps, or auto to train on "
                                                  "every source with an epoch limit to its end"),
                           APPLIED)
    lr: float = key(1e-3, number(), APPLIED)
    # floor of the cosine decay
    min_lr: float = key(1e-4, number(positive=False), APPLIED)
    warmup_steps: int = key(20, natural, APPLIED)
    # on matrices (embeddings included), not on norm gains
    weight_decay: float = key(0.1, number(positive=False), APPLIED)
    beta1: float = key(0.9, number(positive=False, below=1), APPLIED)
    beta2: float = key(0.95, number(positive=False, below=1), APPLIED)
    # max global gradient norm; 0 disables clipping
    grad_clip: float = key(1.0, number(positive=False), APPLIED)
    # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    precision: str = key(AUTO, one_of(PRECISIONS), FREE)
    seed: int = key(1234, natural,
                    refused("it decides the initial weights and the order of the files"))
    log_interval: int = key(10, count(), FREE)
    # 0 disables validation
    eval_interval: int = key(100, natural, FREE)
    # lm-evaluation-harness tasks scored on the trained weights, charted as
    # Eval/<task>/<metric>: names, or task YAML files (needs the [eval] extra)
    eval_tasks: list[str] = key([], a_list(), FREE, entries=text())
    # steps between scorings of eval_tasks (and at the last step); 0: never
    eval_task_interval: int = key("${train.eval_interval}", natural, FREE)
    # documents of each task scored, at most (lm_eval's --limit); None: all
    eval_task_limit: int | None = key(None, count(optional=True), FREE)
    # few-shot examples before each document; None: each task's own
    eval_task_fewshot: int | None = key(None, natural_or_none, FREE)
    # the folder of the mtnlg tasks' data (as raytron eval --data-dir)
    eval_task_data_dir: str | None = key(None, text(optional=True), FREE)
    # per device, for MFU; None: known GPU table or measured
    peak_flops: float | None = key(None, number(optional=True), FREE)
    # none | full | selective | k: recompute every k-th layer; selective: every layer,
    # keeping its matmul outputs
    activation_checkpointing: int | str = key("none", count_or(
        tuple(RECOMPUTE_NAMED), "use none, full, selective, or k >= 1 to recompute every "
                                "k-th layer"), FREE)
    # torch.compile each transformer block (inductor; first steps slower)
    compile: bool = key(False, anything, FREE)
    # lm: next-token loss on the learned tokens (pre-training, fine-tuning) | dpo: direct
    # preference optimisation on preference pairs (data.sources of format preference)
    objective: str = key("lm", one_of(OBJECTIVES), refused(
        "it decides what the trained weights are optimised for"))
    dpo: DpoConfig = section(DpoConfig)
    # LoRA adapters on a frozen model (train.lora.rank > 0 turns them on)
    lora: LoraConfig = section(LoraConfig, refused(
        "the adapters are the trained weights: their shape and where they sit are fixed"))


@dataclass
class SourceConfig:  # every key refused on resume (DataConfig.sources, validation_sources)
    # file, folder, glob, s3://, gs://, or the embedded reference
    path: str = key(EMBEDDED_CORPUS, text())
    # auto (by extension) | text | jsonl | parquet | chat | prompt_completion | preference
    # (fine-tuning samples in JSONL, or Parquet by its extension; preference: pairs of a
    # prompt and a chosen and a rejected completion, text or chat messages, for DPO)
    format: str = key(AUTO, one_of(FORMATS))
    # JSONL / Parquet field holding the document
    text_field: str = key("text", text())
    # chat: the list of {role, content} turns
    messages_field: str = key("messages", text())
    # prompt_completion, preference: the prompt (never learned) ...
    prompt_field: str = key("prompt", text())
    # ... and the completion (learned, then EOS)
    completion_field: str = key("completion", text())
    # preference: the completion preferred ...
    chosen_field: str = key("chosen", text())
    # ... and the one not
    rejected_field: str = key("rejected", text())
    # text files: one document per file | per paragraph
    document: str = key("file", one_of(DOCUMENTS))
    # share of the training tokens, relative to the other sources
    weight: float = key(1.0, number())
    # passes over this source; None: repeat it forever
    epochs: int | None = key(None, count(optional=True))


@dataclass
class DataConfig:
    # or paths
    sources: list[SourceConfig] = key([SourceConfig()], a_list(non_empty=True),
                                      refused("they decide the documents every step sees"))
    # else val_share
    validation_sources: list[SourceConfig] = key([], a_list(), refused(
        "they decide which documents are held out, and whether training holds any out of "
        "its sources"))
    # a tokenizer.json; None trains a byte-level BPE on the corpus
    tokenizer: str | None = key(None, text(optional=True), refused(
        f"{SAME_TOKENIZER} (tokenizer.json in its directory)"))
    # size of the BPE tokenizer trained when none is given
    vocab_size: int = key(4096, count(MAX_VOCABULARY), refused(SAME_TOKENIZER))
    # corpus bytes the BPE tokenizer is trained on, at most
    tokenizer_sample_mb: int = key(200, count(), refused(SAME_TOKENIZER))
    seq_len: int = key(128, count(MAX_SEQUENCE), refused(
        "it is the model's sequence length, which the checkpoints were written for"))
    # share of documents held out for validation (by content hash)
    val_share: float = key(0.05, number(positive=False, below=1),
                           refused("it decides which documents are held out of training"))
    # held-out sequences scored at each validation
    val_sequences: int = key(64, count(), FREE)
    # Ray actors tokenizing; auto: the CPUs left free
    tokenizer_workers: int | str = key(AUTO, count_or(
        (AUTO,), "use e.g. 2, or auto to use the CPUs the training workers leave"), FREE)
    # tokenized files, kept for every later epoch, restart and run with the same file and
    # tokenizer, and trained tokenizers, kept for runs on the same sample (a path or URI);
    # null: off
    cache: str | None = key("${run.root}/token_cache", text(optional=True), FREE)
    # global batches prepared ahead of training
    prefetch_steps: int = key(4, count(), FREE)
    # longer records are skipped as `oversized`
    max_document_mb: int = key(64, count(), refused("it decides which records are skipped"))
    # shuffle training documents within windows of this many; 0: off
    shuffle_window: int = key(0, natural, refused("it decides the order of the documents"))
    # put the tokenizer's BOS before every document (EOS always ends one)
    bos: bool = key(False, anything, refused("it changes the tokens of every document"))
    # stream: documents concatenated and cut (pre-training) | samples: whole samples per
    # sequence, padded (fine-tuning) | auto: samples with chat or prompt_completion sources,
    # else stream
    packing: str = key(AUTO, one_of(PACKINGS), refused(
        "it decides how samples fill the sequences every step sees"))
    # how chat samples are rendered: auto: the template of model.init_from's model when it
    # has one (a Hugging Face folder's, or a run's), else ChatML | chatml: ChatML (its
    # turn markers added to the tokenizer when missing)
    chat_template: str = key(AUTO, one_of(CHAT_TEMPLATES), refused(
        "it changes the tokens of every chat sample"))
    # samples: each attends only within itself, positions from 0
    document_mask: bool = key(True, anything, FREE)
    # samples longer than seq_len + 1 tokens: drop (counted) | truncate
    overlong: str = key("drop", one_of(OVERLONG),
                        refused("it decides which samples are dropped"))
    # a resumed run's sources list other files than its checkpoint recorded: error |
    # next_epoch (files added are read from the next epoch on)
    on_new_files: str = key("error", one_of(ON_NEW_FILES), FREE)


@dataclass
class CheckpointConfig:
    dir: str = key("${run.root}/${run.name}/checkpoints", text(),
                   refused("it is where the run's checkpoints are"))
    # steps between checkpoints; one is always written at the end
    interval: int = key(100, count(), FREE)
    keep_last: int = key(2, count(), FREE)
    # write shards in the background; committed at a later step
    async_save: bool = key(False, anything, FREE)
    # steps between in-memory snapshots (each rank's state held by its node's keeper and
    # copied to the next node's): a restart loads the newest one whole; auto: every step
    # when the nodes' memory holds them, else none; 0: none
    memory_interval: int | str = key(AUTO, count_or(
        (AUTO,), "use e.g. 1, auto for every step where they fit, or 0 for none", lowest=0),
        FREE)


@dataclass
class TrackingConfig:
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<run.root>/mlflow.db
    uri: str | None = key(None, text(optional=True), APPLIED)
    experiment: str = key("raytron", folder_name, refused(
        "the run's MLflow run lives in the experiment it started in"))
    run_name: str = key("${run.name}", text(), APPLIED)
    # each worker node's CPU, memory, disk, network (and GPU use with pynvml) in the MLflow
    # run, as system/<host>/...
    system_metrics: bool = key(True, anything, FREE)
    # how often each node samples them
    system_metrics_interval_s: float = key(10.0, number(minimum=1, positive=False), FREE)


@dataclass
class ClusterConfig:
    # None: $RAY_ADDRESS, else start a local Ray
    address: str | None = key(None, text(optional=True), FREE)
    # one per device; None: pp * dp * tp (dp=auto: give it)
    workers: int | None = key(None, count(optional=True), FREE)
    # also the torch threads of each worker
    cpus_per_worker: int = key(1, count(), FREE)
    # None: 1 when the cluster has GPUs, else 0
    gpus_per_worker: int | None = key(None, number(positive=False, optional=True), FREE)
    # CPUs of a locally started Ray; None: enough for the run
    num_cpus: int | None = key(None, count(optional=True), FREE)
    # Ray's dashboard (http://127.0.0.1:8265) for a locally started Ray
    dashboard: bool = key(True, anything, FREE)
    # refuse layouts whose estimate exceeds it
    device_memory_gb: float | None = key(None, number(optional=True), FREE)
    # more Ray resources each worker asks for, e.g. {"trainer": 1} to keep workers on nodes
    # that offer it
    worker_resources: dict[str, float] = key({}, anything, FREE, entries=worker_resource)


@dataclass
class FaultsConfig:
    # what a failed worker costs: restart: the worker group restarts from the newest
    # in-memory snapshot or checkpoint | replicas: each worker is a data-parallel
    # replica; the others go on without a lost one, which is replaced and joins again
    # (with parallel.dp=auto they start as many as fit and relaunch to grow)
    mode: str = key("restart", one_of(FAULT_MODES), FREE)
    # worker-group restarts from the last checkpoint before the run fails (replicas: the
    # replicas Ray Train replaces in one worker group, each lost replica counting one)
    max_restarts: int = key(3, natural, FREE)
    # wait before a restart; doubles each time, at most 60 s
    restart_backoff_s: float = key(2.0, number(positive=False), FREE)
    # a rank without progress this long is failed (watchdog)
    hang_timeout_s: float = key(600.0, number(), FREE)
    # ... while it saves a checkpoint
    checkpoint_timeout_s: float = key(1800.0, number(), FREE)
    # ... while it runs validation
    eval_timeout_s: float = key(1800.0, number(), FREE)
    # ... while it scores train.eval_tasks
    eval_task_timeout_s: float = key(1800.0, number(), FREE)
    # drills: "kill rank 1 at step 7", ...
    inject: list[str] = key([], a_list(), FREE, entries=drill)
    # with parallel.dp=auto: the fewest replicas the run goes on with
    min_dp: int = key(1, count(), FREE)
    # wait this long for the largest layout before a smaller
    schedule_timeout_s: float = key(60.0, number(), FREE)
    # while smaller than it could be: look for capacity this often
    capacity_check_s: float = key(30.0, number(), FREE)


@dataclass
class RaytronConfig:
    run: RunSection = section(RunSection)
    model: ModelConfig = section(ModelConfig, refused(
        "it is the model's shape, which the checkpoints were written for"))
    parallel: ParallelConfig = section(ParallelConfig)
    train: TrainConfig = section(TrainConfig)
    data: DataConfig = section(DataConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)
    tracking: TrackingConfig = section(TrackingConfig)
    cluster: ClusterConfig = section(ClusterConfig)
    faults: FaultsConfig = section(FaultsConfig)


class ConfigError(ValueError):
    """An invalid config; the message names every bad key and how to fix it."""

    heading: str | None = None  # what the command line says before the problems, if not
    # its own ("invalid config", "cannot serve", ...)

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(f"  - {p}" for p in problems))
