"""`raytron train`: settle the run, open its MLflow run, start its actors and supervise
its worker groups until it is done. Everything that can be wrong with a run is found
while settling it, before any Ray resource is taken."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import torch

from raytron.model.gpt import GPT
from raytron.pipelines.chat import save_chat_template
from raytron.pipelines.mixture import DataExhausted, ran_out
from raytron.platform.config.layout import Layout
from raytron.platform.config.load import flatten, to_dict, to_yaml
from raytron.platform.config.plan import human
from raytron.platform.config.redact import redacted
from raytron.platform.config.resolve import gpt_shape
from raytron.platform.config.resume import changes
from raytron.platform.config.schema import AUTO, ConfigError, RaytronConfig
from raytron.platform.control.actors import run_actors
from raytron.platform.control.console import Console
from raytron.platform.control.placement import start_ray
from raytron.platform.control.run_log import LOG_FILE, RunLog
from raytron.platform.control.settle import SettledRun, settle
from raytron.platform.control.supervisor import Supervisor, not_retried
from raytron.platform.models.lora_base import base_reference, record_base
from raytron.platform.storage.checkpoint import CheckpointStore, CheckpointUnreadable
from raytron.platform.storage.data_end import data_ended_at, record_data_end
from raytron.platform.storage.lease import RunLeases, run_folders
from raytron.platform.storage.run_dir import RunPaths
from raytron.platform.storage.tracking import (
    RunTracking,
    dashboard_command,
    local_artifact_location,
    run_url,
)


def train(config: RaytronConfig) -> int:
    """Run (or resume) a training run; returns the process exit code (a `ConfigError`
    propagates: the command line makes it exit status 2). The run's leases are taken
    first: a second training of the same run is refused before it does anything."""
    paths = RunPaths.of(config)
    with RunLeases(run_folders(paths), config.run.name) as leases, \
            RunLog(paths.dir / LOG_FILE) as log:
        return train_holding(config, leases, log)


def train_holding(config: RaytronConfig, leases: RunLeases, log: RunLog) -> int:
    """`train`, once the run's leases are held and what is not raytron's goes to `log`."""
    run = settle(config)
    c, paths = run.config, run.paths
    done = run.committed[-1] if run.committed else 0
    auto = c.train.steps == AUTO
    if not auto and done >= c.train.steps:
        print(finished_already(paths, done, c.train.steps))
        return 0
    if not auto and run.committed and data_ended_at(paths.dir, c.train.global_batch) == done:
        print(f"\nTraining stopped: {ran_out(done, c.train.steps)}")  # as the last time,
        return 1  # without starting Ray only to run out again
    last_start = paths.saved_config()  # before this start's config replaces it
    paths.dir.mkdir(parents=True, exist_ok=True)
    saved = to_yaml(redacted(c))  # credentials never reach a file
    paths.config_file.write_text(saved)
    store = CheckpointStore(paths.checkpoints, c.checkpoint.keep_last)
    store.claim(saved)
    if c.train.lora.rank:
        record_base(store, base_reference(c))
    run.tokenizer.save(str(paths.tokenizer_file))
    save_chat_template(run.spec.chat_template, paths.dir)
    try:
        start, failure = store.newest_intact(run.committed), None
    except CheckpointUnreadable as error:  # known before Ray starts; the run ends below
        start, failure = None, error
    if failure is None:
        (tracking, run_id, reopened), failure = opened_while_ray_starts(run, last_start)
    else:
        tracking, run_id, reopened = open_tracking(run, last_start)
    print(describe_start(run, tracking, run_id, reopened))
    console = Console(None if auto else c.train.steps, done)
    status, code, message = "FINISHED", 0, ""
    try:
        if failure is not None:  # as if raised here: the run ends failed or stopped
            raise failure
        with run_actors(c, run.spec, run.tokenizer.to_str(), tracking.uri, run_id, console,
                        log) as actors:
            if auto:
                c = with_counted_steps(c, actors["feeder"], console)
                tracking.record_event(run_id, "steps", done, f"train.steps=auto: the data "
                                      f"gives {c.train.steps} steps")
            if done >= c.train.steps:
                message = finished_already(paths, done, c.train.steps)
            else:
                read_ahead(actors["feeder"], store, start)
                Supervisor(c, paths, tracking, run_id, run.gpus, console, actors,
                           leases.tokens()).run()
    except KeyboardInterrupt:
        status, code, message = "KILLED", 130, stopped(c, paths, tracking, run_id, console)
    except CheckpointUnreadable as error:
        status, code, message = "FAILED", 1, f"\nCannot resume run '{c.run.name}': {error}"
    except ConfigError as error:
        status, code, message = "FAILED", 2, f"\nraytron: invalid config:\n{error}"
    except not_retried() as error:  # the same command would fail the same way
        status, code, message = "FAILED", 1, f"\nTraining stopped: {error}"
        step = CheckpointStore(paths.checkpoints, c.checkpoint.keep_last).latest() or 0
        tracking.record_event(run_id, "stop", step, f"training stopped: {error}")
        if isinstance(error, DataExhausted):
            record_data_end(paths.dir, step, c.train.global_batch)
    except Exception as error:
        status, code = "FAILED", 1
        message = (f"\nTraining failed: {error}\nWhat Ray and the workers said: {log.path}\n"
                   f"The last committed checkpoint is kept in "
                   f"{paths.checkpoints}; run the same command again to resume from it.")
    finally:
        console.close()
    tracking.finish(run_id, status)
    print(message or f"Finished {c.train.steps} steps. Checkpoints: {paths.checkpoints}\n"
                     f"MLflow run {run_id} in {tracking.uri}\n{run_page(tracking, run_id)}")
    return code


def opened_while_ray_starts(run: SettledRun, last_start: dict | None
                            ) -> tuple[tuple[RunTracking, str, bool], BaseException | None]:
    """`open_tracking` in a thread while Ray starts here (each takes seconds of a run's
    start; Ray's signal handlers want the main thread): the opened run, and what Ray's
    start raised (Ctrl-C too), for the run to end as it would have."""
    with ThreadPoolExecutor(1) as pool:
        opening = pool.submit(open_tracking, run, last_start)
        try:
            start_ray(run.config)
            error = None
        except BaseException as raised:  # noqa: BLE001 (re-raised once the run is open)
            error = raised
        return opening.result(), error


def read_ahead(feeder, store: CheckpointStore, start: int | None) -> None:
    """Have the feeder make the first batches while the workers start: from where they
    will most likely resume (the newest intact checkpoint's cursor), else the start. When
    they ask for another place, it reads from there instead."""
    feeder.seek.remote(start or 0, store.meta(start).get("cursor", {}) if start else {},
                       ahead=True)


def stopped(c: RaytronConfig, paths: RunPaths, tracking: RunTracking, run_id: str,
            console: Console) -> str:
    """Ctrl-C: end the worker group (with the Ray it runs in), record the stop, and say
    where the run stands and how it goes on."""
    import ray

    ray.shutdown()  # the group's actors are this process's: they end with it
    step = CheckpointStore(paths.checkpoints, c.checkpoint.keep_last).latest() or 0
    where = f"stopped at step {console.step}; the last checkpoint is step {step}"
    tracking.record_event(run_id, "stop", console.step, f"{where} (Ctrl-C)")
    return f"\n{where.capitalize()}; run the same command to resume."


def finished_already(paths: RunPaths, done: int, steps: int) -> str:
    return (f"{paths.dir} already finished {done} steps (train.steps={steps}). Raise "
            "train.steps to train on, or pick a new run.name.")


def with_counted_steps(c: RaytronConfig, feeder, console: Console) -> RaytronConfig:
    """`train.steps=auto` made a number: the whole global batches the data gives, counted
    by the feeder's pass over it (the LR schedule decays over them)."""
    import ray

    console.write("train.steps=auto: counting the steps the data gives (one pass over "
                      "it; its tokens are kept in the token cache for training)")
    steps = ray.get(feeder.count_steps.remote())
    if steps == 0:
        raise ConfigError([f"train.steps=auto: the data gives less than one global batch "
                           f"(train.global_batch={c.train.global_batch} sequences of "
                           f"data.seq_len={c.data.seq_len} tokens). Fix: lower "
                           "train.global_batch, raise the sources' epochs, or add data."])
    console.write(f"train.steps=auto: the data gives {steps} steps of "
                      f"{c.train.global_batch} sequences")
    console.resize(steps)
    return dataclasses.replace(c, train=dataclasses.replace(c.train, steps=steps))


def open_tracking(run: SettledRun, last_start: dict | None) -> tuple[RunTracking, str, bool]:
    """The run's MLflow run (reopened when the run directory names one), with the
    redacted config as params, the config file and tokenizer as artifacts, and a resume
    naming what changed since the config of `last_start`."""
    c, paths = run.config, run.paths
    uri = c.tracking.uri
    tracking = RunTracking(uri, c.tracking.experiment,
                           local_artifact_location(uri, paths.root, c.tracking.experiment))
    params, description = flatten(to_dict(redacted(c))), about(c)
    run_id, reopened = tracking.open(paths.dir, c.tracking.run_name, params, description)
    if reopened or run.committed:  # a resume, in its MLflow run or a new one (a new store)
        changed = changes(last_start, params) if last_start else []
        tracking.record_resume(run_id, run.committed[-1] if run.committed else 0, changed,
                               description)
    for path in (paths.config_file, paths.tokenizer_file):
        tracking.log_artifact(run_id, path)
    return tracking, run_id, reopened


def describe_start(run: SettledRun, tracking: RunTracking, run_id: str, reopened: bool) -> str:
    c = run.config
    if run.committed:
        lines = [f"Continuing run '{c.run.name}' in {run.paths.dir}: committed checkpoints "
                 f"at step {', '.join(map(str, run.committed))}"]
        lines += [f"  applied from the resumed step on: {change}" for change in run.applied]
    else:
        lines = [f"Starting run '{c.run.name}' in {run.paths.dir}"]
    lines.append(f"MLflow run {run_id} ({'reopened' if reopened else 'new'}) in {c.tracking.uri}")
    lines.append(run_page(tracking, run_id))
    lines.append(f"Layout {layout_summary(c)}")
    lines.append(f"Ray's and the workers' own output: {run.paths.dir / LOG_FILE}")
    return "\n".join(lines)


def run_page(tracking: RunTracking, run_id: str) -> str:
    """Where to see the run: its page in MLflow's training view, and for a local store
    the command that serves it."""
    command = dashboard_command(tracking.uri)
    return f"  {run_url(tracking.uri, tracking.experiment_id, run_id)}" + (
        f"  (after: {command})" if command else "")


def layout_summary(c: RaytronConfig) -> str:
    """The layout the run asks for: "pp=1 dp=2 tp=1 on 2 worker(s)", or its elastic range."""
    p, workers = c.parallel, c.cluster.workers
    tp = f"cp={p.cp} tp={p.tp}" if p.cp > 1 else f"tp={p.tp}"
    size = (f"dp=auto {tp} on up to {workers} worker(s), elastic: dp from "
            f"{c.faults.min_dp} to {Layout.of(c).dp}") if p.dp == AUTO \
        else f"dp={p.dp} {tp} on {workers} worker(s)"
    return f"pp={p.pp} {size}"


def about(c: RaytronConfig) -> str:
    """The first line of the MLflow run's description (Markdown): what is trained how."""
    with torch.device("meta"):
        params = GPT(gpt_shape(c.model)).num_params()
    m, t = c.model, c.train
    return (f"**{c.run.name}**: a {human(params)}-parameter GPT ({m.n_layers} layers, "
            f"{m.d_model} wide), {t.steps} steps of {t.global_batch} x {c.data.seq_len} "
            f"tokens; layout {layout_summary(c)}")
