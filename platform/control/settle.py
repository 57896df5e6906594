"""Settling a run before any Ray resource is taken: one step from the validated config
to the config the run will use, with everything that could be wrong checked.

Settled are the tokenizer workers (from the CPUs the workers leave free), the model
shape (from the tokenizer: the run's own when it resumes, else given or trained), the
absolute locations (so that the saved config names where things are, whatever the
directory a later command runs from). Checked are the placement of a tensor-parallel
group on a node, the vocabulary against the tokenizer, the in-memory snapshots against
the nodes' memory, and, when the run resumes, every key a resumed run cannot change
(`config/resume.py`) and the files its data cursor counts in (`pipelines/file_lists.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tokenizers import Tokenizer

from raytron.pipelines.chat import CHATML, ChatTemplate, with_chat_tokens
from raytron.pipelines.file_lists import resumed_spec
from raytron.pipelines.sources import CHAT, sample_kind
from raytron.pipelines.stream import StreamSpec
from raytron.pipelines.tokenizer import load
from raytron.pipelines.tokenizer_cache import keep_tokenizer, kept_path, kept_tokenizer, sample_key
from raytron.platform.config.load import flatten, to_dict
from raytron.platform.config.redact import redact_text, redacted
from raytron.platform.config.resolve import resolve_model
from raytron.platform.config.resume import (
    applied_changes,
    reference_problems,
    resume_problems,
)
from raytron.platform.config.schema import CHATML as CHATML_NAME
from raytron.platform.config.schema import ConfigError, RaytronConfig
from raytron.platform.config.validate import (
    placement_problems,
    raise_problems,
    snapshot_problems,
    tokenizer_problems,
)
from raytron.platform.control.corpus import (
    sample_bytes,
    stream_spec,
    train_tokenizer,
    with_tokenizer,
)
from raytron.platform.control.placement import node_resources, with_tokenizer_workers, worker_gpus
from raytron.platform.models.initial import initial_chat_template, with_room_for
from raytron.platform.models.lora_base import check_base
from raytron.platform.models.sources import chat_template_of
from raytron.platform.storage.checkpoint import CheckpointStore
from raytron.platform.storage.run_dir import RunPaths, absolute, with_locations
from raytron.platform.storage.tracking import tracking_uri


@dataclass(frozen=True)
class SettledRun:
    config: RaytronConfig  # what the run uses; saved (redacted) as config.yaml
    paths: RunPaths
    spec: StreamSpec  # the data stream, with the tokenizer
    tokenizer: Tokenizer
    gpus: float  # per worker
    committed: list[int]  # committed checkpoint steps: the run resumes when there are any
    applied: list[str]  # "key: old -> new" for each applied change since the last start


def settle(config: RaytronConfig) -> SettledRun:
    """Raises `ConfigError` for anything that would make the run fail or resume wrongly."""
    nodes = node_resources(config)
    gpus = worker_gpus(config, nodes)
    raise_problems(placement_problems(config, nodes, gpus))
    config = with_tokenizer_workers(config, nodes)
    config = with_absolute_locations(config)
    paths = RunPaths.of(config)
    store = CheckpointStore(paths.checkpoints, config.checkpoint.keep_last)
    committed = store.committed_steps()
    owner = checkpoints_owner(config, paths, store, committed) if committed else None
    spec = stream_spec(config)
    tokenizer = run_tokenizer(config, paths, spec, resuming=bool(committed))
    template = run_chat_template(config, paths, resuming=bool(committed))
    if template == CHATML and any(sample_kind(s.path, s.format) == CHAT
                                  for s in config.data.sources):
        tokenizer = with_chat_tokens(tokenizer)
    config = with_room_for(config, tokenizer.get_vocab_size())
    raise_problems(tokenizer_problems(config, tokenizer.get_vocab_size()))
    spec = dataclasses.replace(spec, chat_template=template)
    config = dataclasses.replace(config, model=resolve_model(config.model,
                                                             tokenizer.get_vocab_size()))
    raise_problems(snapshot_problems(config, nodes, gpus))
    applied: list[str] = []
    if owner is not None:
        saved = paths.saved_config() or owner  # as the run last started
        current = flatten(to_dict(redacted(config)))
        raise_problems(resume_problems(saved, current, config.run.name, committed[-1])
                       + reference_problems(saved, current, config.run.name, committed[-1]))
        if config.train.lora.rank:
            check_base(store, config)
        applied = applied_changes(saved, current)
        spec = resumed_data(spec, store, committed, config.data.on_new_files)
    try:
        spec = with_tokenizer(spec, tokenizer)
    except ValueError as error:  # the tokenizer lacks an EOS, or the BOS asked for
        raise ConfigError([f"data.tokenizer: {error}"]) from None
    check_eval_tasks(config, tokenizer)
    return SettledRun(config, paths, spec, tokenizer, gpus, committed,
                      applied)


def run_chat_template(config: RaytronConfig, paths: RunPaths, resuming: bool) -> ChatTemplate:
    """The template chat samples are rendered with: a resuming run's own; else, unless
    data.chat_template=chatml, model.init_from's model's; else ChatML."""
    if resuming:
        saved = chat_template_of(paths.dir)
        if saved is not None:
            return saved
    if config.data.chat_template == CHATML_NAME:
        return CHATML
    return initial_chat_template(config) or CHATML


def check_eval_tasks(config: RaytronConfig, tokenizer: Tokenizer) -> None:
    """train.eval_tasks' requests built once (as the run's judge will build them): a task
    lm_eval does not know, data it cannot read or requests longer than the training's
    sequences are a ConfigError now, not a failure once the workers run."""
    if not config.train.eval_tasks:
        return
    from raytron.platform.models.task_eval import require_harness

    require_harness("train.eval_tasks")
    from raytron.platform.models.task_judge import TaskJudge

    print(f"Preparing train.eval_tasks: {', '.join(config.train.eval_tasks)}")
    TaskJudge(config, tokenizer.to_str())


def checkpoints_owner(config: RaytronConfig, paths: RunPaths, store: CheckpointStore,
                      committed: list[int]) -> dict:
    """The saved config of the run whose checkpoints `checkpoint.dir` holds, when that is
    this run; `ConfigError` when they are another run's, or no run's that raytron knows:
    a run never adopts checkpoints it did not write."""
    saved = store.saved_config()
    if saved is None:  # written before raytron kept its config beside the checkpoints
        own = paths.saved_config()
        saved = own if own and own.get("checkpoint.dir") == redact_text(paths.checkpoints) \
            else None
    where = f"checkpoint.dir {paths.checkpoints} holds committed checkpoints (step " \
            f"{', '.join(map(str, committed))})"
    if saved is None:
        raise ConfigError([f"{where} but no config of the run that wrote them, neither beside "
                           f"them nor in {paths.dir}: raytron does not adopt checkpoints it "
                           "cannot tell are this run's. Fix: give this run a checkpoint.dir "
                           "of its own (the default is <run.root>/<run.name>/checkpoints), or "
                           "delete those checkpoints if they are of no use."])
    if saved.get("run.name") != config.run.name:
        raise ConfigError([f"{where} of run '{saved.get('run.name')}', not of run "
                           f"'{config.run.name}'. Fix: resume that run with "
                           f"run.name={saved.get('run.name')}, or give this run a "
                           "checkpoint.dir of its own (the default is "
                           "<run.root>/<run.name>/checkpoints)."])
    return saved


def resumed_data(spec: StreamSpec, store: CheckpointStore, committed: list[int],
                 on_new_files: str) -> StreamSpec:
    """The stream a resumed run reads: the file lists its newest readable checkpoint
    recorded (`pipelines/file_lists.py`); `ConfigError` naming each source whose files
    changed in a way the run cannot take."""
    for step in reversed(committed):
        try:
            cursor = store.meta(step).get("cursor") or {}
        except (OSError, ValueError):  # damaged: the workers will skip it too
            continue
        try:
            spec, problems = resumed_spec(spec, cursor, on_new_files, step)
        except (TypeError, ValueError, KeyError) as error:  # lists not as raytron wrote them
            raise ConfigError([f"the checkpoint at step {step} records its data's file lists "
                               f"in a form raytron cannot read ({error}). Fix: resume with "
                               "the raytron version that wrote it."]) from None
        raise_problems(problems)
        return spec
    return spec


def run_tokenizer(config: RaytronConfig, paths: RunPaths, spec: StreamSpec,
                  resuming: bool) -> Tokenizer:
    """A resuming run's own tokenizer; otherwise `data.tokenizer`, or one trained now. A
    resuming run never trains a new one: its checkpoints were trained with the old."""
    if resuming and paths.tokenizer_file.is_file():
        return load(paths.tokenizer_file)
    if config.data.tokenizer:
        return load(config.data.tokenizer)
    if resuming:
        raise ConfigError([f"run '{config.run.name}' has committed checkpoints in "
                           f"{paths.checkpoints} but its tokenizer, {paths.tokenizer_file}, is "
                           "missing: a new tokenizer would give the checkpoints other tokens. "
                           "Fix: put the run's tokenizer.json back, or set data.tokenizer to "
                           "it."])
    vocabulary = config.data.vocab_size
    key = sample_key(spec, vocabulary, sample_bytes(config))
    if key and (kept := kept_tokenizer(spec.cache, key)):
        print(f"Using the {vocabulary}-token tokenizer trained on the same corpus before "
              f"({kept_path(spec.cache, key)})")
        return kept
    print(f"Training a {vocabulary}-token byte-level BPE tokenizer on the corpus")
    tokenizer = train_tokenizer(config, spec)
    if key:
        keep_tokenizer(spec.cache, key, tokenizer)
    return tokenizer


def with_absolute_locations(config: RaytronConfig) -> RaytronConfig:
    """Run root, checkpoints, the tracking store, local sources, the tokenizer and the
    initial weights, as absolute locations: Ray workers run in other directories, and so
    may a later command."""
    config = with_locations(config, lambda key, path: absolute(path))
    return dataclasses.replace(config, tracking=dataclasses.replace(
        config.tracking, uri=tracking_uri(config.tracking.uri, config.run.root)))
