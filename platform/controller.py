"""The controller: prepares a run, starts or joins Ray, and runs the worker group.

Everything that can be wrong with a run (config, paths, tokenizer, a different model
in the run directory) is checked here before any Ray resource is taken. Then it
starts the Tracker and the DataFeeder actors and a Ray Train `TorchTrainer` whose
workers run `worker.train_loop`, and draws the progress from the tracker's records.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from raytron.pipelines.stream import StreamSpec
from raytron.pipelines.tokenizer import load
from raytron.platform.checkpoint import CheckpointStore
from raytron.platform.config import ConfigError, RaytronConfig, flatten, to_dict, to_yaml
from raytron.platform.console import Console
from raytron.platform.corpus import stream_spec, train_tokenizer, with_tokenizer
from raytron.platform.layout import Layout
from raytron.platform.placement import (
    check_tensor_parallel_fits_a_node,
    cluster_address,
    node_resources,
    start_ray,
    with_tokenizer_workers,
    worker_gpus,
)
from raytron.platform.shapes import resolve_model
from raytron.platform.tracking import RunTracking, local_artifact_location, tracking_uri

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class RunPaths:
    """Where one run keeps its files; absolute, since Ray workers run elsewhere."""

    root: Path  # all runs, and the local MLflow store
    dir: Path  # this run: config, tokenizer, MLflow run id
    checkpoints: str  # an absolute path, or an object-storage URI

    @classmethod
    def of(cls, config: RaytronConfig) -> RunPaths:
        root = Path(config.run.root).expanduser().absolute()
        checkpoints = config.checkpoint.dir
        if "://" not in checkpoints:
            checkpoints = str(Path(checkpoints).expanduser().absolute())
        return cls(root, root / config.run.name, checkpoints)


def prepare(config: RaytronConfig) -> tuple[RaytronConfig, RunPaths, StreamSpec]:
    """Resolve the model against the tokenizer and check the run directory, before Ray."""
    paths = RunPaths.of(config)
    spec = stream_spec(config)
    tokenizer_path = paths.dir / TOKENIZER_FILE
    if tokenizer_path.is_file():
        tokenizer = load(tokenizer_path)
    elif config.data.tokenizer:
        tokenizer = load(config.data.tokenizer)
    else:
        print(f"Training a {config.data.vocab_size}-token byte-level BPE tokenizer on the corpus")
        tokenizer = train_tokenizer(config, spec)
    vocab = tokenizer.get_vocab_size()
    if config.model.vocab_size is not None and config.model.vocab_size < vocab:
        raise ConfigError([
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{vocab} tokens. Fix: leave model.vocab_size unset or raise it to {vocab} or more."
        ])
    config = dataclasses.replace(config, model=resolve_model(config.model, vocab))
    check_same_model(config, paths)
    paths.dir.mkdir(parents=True, exist_ok=True)
    if not tokenizer_path.is_file():
        tokenizer.save(str(tokenizer_path))
    try:
        return config, paths, with_tokenizer(spec, tokenizer)
    except ValueError as error:  # the tokenizer lacks an EOS, or the BOS asked for
        raise ConfigError([f"data.tokenizer: {error}"]) from None


def check_same_model(config: RaytronConfig, paths: RunPaths) -> None:
    """Resuming needs the same model and sequence length; anything else may change."""
    saved_file = paths.dir / CONFIG_FILE
    if not saved_file.is_file():
        return
    saved = flatten(OmegaConf.to_container(OmegaConf.load(saved_file)))
    current = flatten(to_dict(config))
    keys = [k for k in current if k.startswith("model.") or k == "data.seq_len"]
    changed = [f"{k}: {saved.get(k)} -> {current[k]}" for k in keys if saved.get(k) != current[k]]
    if changed:
        raise ConfigError([
            f"{paths.dir} holds a run of a different model ({'; '.join(changed)}), which its "
            f"checkpoints cannot load into. Fix: choose a new run.name, or delete {paths.dir}."
        ])


def train(config: RaytronConfig) -> int:
    """Run (or resume) a training run; returns the process exit code."""
    nodes = node_resources(config)
    check_tensor_parallel_fits_a_node(config, nodes)
    config = with_tokenizer_workers(config, nodes)
    config, paths, spec = prepare(config)
    store = CheckpointStore(paths.checkpoints, config.checkpoint.keep_last)
    resumed_step = store.latest() or 0
    if resumed_step >= config.train.steps:
        print(f"{paths.dir} already finished {resumed_step} steps (train.steps="
              f"{config.train.steps}). Raise train.steps to train on, or pick a new run.name.")
        return 0
    uri = tracking_uri(config.tracking.uri, paths.root)
    config = with_measured_cpu_peak(with_absolute_locations(config, paths, uri))
    (paths.dir / CONFIG_FILE).write_text(to_yaml(config))
    tracking = RunTracking(uri, config.tracking.experiment,
                           local_artifact_location(uri, paths.root, config.tracking.experiment))
    run_id, reopened = tracking.open(paths.dir, config.tracking.run_name,
                                     flatten(to_dict(config)))
    for name in (CONFIG_FILE, TOKENIZER_FILE):
        tracking.log_artifact(run_id, paths.dir / name)
    if resumed_step:
        tracking.set_tag(run_id, "raytron.resumed_from_step", str(resumed_step))
    print(describe_start(config, paths, uri, run_id, resumed_step, reopened))
    try:
        run_worker_group(config, paths, spec, tracking, run_id, resumed_step,
                         worker_gpus(config, nodes))
    except KeyboardInterrupt:
        tracking.finish(run_id, "KILLED")
        print(f"\nInterrupted. Run the same command again to resume from the last committed "
              f"checkpoint in {paths.checkpoints}.")
        return 130
    except Exception as error:
        tracking.finish(run_id, "FAILED")
        print(f"\nTraining failed: {error}\nThe last committed checkpoint is kept in "
              f"{paths.checkpoints}; run the same command again to resume from it.")
        return 1
    tracking.finish(run_id, "FINISHED")
    print(f"Finished {config.train.steps} steps. Checkpoints: {paths.checkpoints}\n"
          f"MLflow run {run_id} in {uri}")
    return 0


def with_absolute_locations(config: RaytronConfig, paths: RunPaths, uri: str) -> RaytronConfig:
    """The saved config names where things are, whatever the directory it ran from."""
    return dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, root=str(paths.root)),
        checkpoint=dataclasses.replace(config.checkpoint, dir=paths.checkpoints),
        tracking=dataclasses.replace(config.tracking, uri=uri),
    )


def with_measured_cpu_peak(config: RaytronConfig) -> RaytronConfig:
    """On a local CPU-only run, measure the matmul peak (for MFU) here, before Ray and its
    actors start: measured inside a busy worker it comes out low and MFU above 100%."""
    if config.train.peak_flops or cluster_address(config):
        return config
    import torch

    from raytron.platform.hardware import measured_matmul_flops

    if torch.cuda.is_available():
        return config
    threads = torch.get_num_threads()
    torch.set_num_threads(config.cluster.cpus_per_worker)
    peak = measured_matmul_flops(torch.device("cpu"), torch.float32)
    torch.set_num_threads(threads)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, peak_flops=peak))


def describe_start(config: RaytronConfig, paths: RunPaths, uri: str, run_id: str,
                   resumed_step: int, reopened: bool) -> str:
    what = f"Resuming from step {resumed_step}" if resumed_step else "Starting"
    mlflow = f"MLflow run {run_id} ({'reopened' if reopened else 'new'}) in {uri}"
    p, workers = config.parallel, config.cluster.workers
    size = (f"dp=auto tp={p.tp} on up to {workers} worker(s), elastic: dp from "
            f"{config.faults.min_dp} to {workers // (p.pp * p.tp)}") if p.dp == "auto" \
        else f"dp={p.dp} tp={p.tp} on {workers} worker(s)"
    return f"{what} run '{config.run.name}' in {paths.dir}\n{mlflow}\nLayout pp={p.pp} {size}"


class RunFailed(RuntimeError):
    """The worker group failed more than faults.max_restarts times."""


def run_worker_group(config: RaytronConfig, paths: RunPaths, spec: StreamSpec,
                     tracking: RunTracking, run_id: str, resumed_step: int, gpus: float) -> None:
    """Start the run's actors, then supervise worker groups until the run is done."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytron.pipelines.feeder import DataFeeder
    from raytron.platform.coordination import Coordinator
    from raytron.platform.tracking import Tracker

    start_ray(config)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tracker = ray.remote(Tracker).options(num_cpus=0, scheduling_strategy=here).remote(
        tracking.uri, run_id)
    coordinator = ray.remote(Coordinator).options(num_cpus=0, scheduling_strategy=here).remote()
    feeder = ray.remote(DataFeeder).options(  # beside the driver: outlives any worker node
        num_cpus=0, max_concurrency=64, scheduling_strategy=here).remote(
        spec, config.data.seq_len, config.train.global_batch, config.data.prefetch_steps,
        config.data.val_sequences,
    )
    console = Console(config.train.steps, resumed_step)
    stop = threading.Event()
    poller = threading.Thread(target=poll, args=(tracker, console, stop), daemon=True)
    poller.start()
    try:
        Supervisor(config, paths, tracking, run_id, gpus, console,
                   {"feeder": feeder, "tracker": tracker, "coordinator": coordinator}).run()
    finally:
        stop.set()
        poller.join()
        console.show(ray.get(tracker.drain.remote()))
        console.close()
        for actor in (feeder, tracker, coordinator):
            ray.kill(actor)


class Supervisor:
    """Runs worker groups until the run is done. After a failure it relaunches from the
    last committed checkpoint, up to faults.max_restarts times with doubling back-off;
    after a requested stop (a resize, a preemption notice) it relaunches without counting
    a failure. An elastic run (parallel.dp=auto) relaunches at the largest dp that fits."""

    def __init__(self, config: RaytronConfig, paths: RunPaths, tracking: RunTracking,
                 run_id: str, gpus: float, console: Console, actors: dict):
        from raytron.platform.capacity import Sizing

        self.config, self.paths, self.tracking, self.run_id = config, paths, tracking, run_id
        self.gpus, self.console, self.actors = gpus, console, actors
        self.store = CheckpointStore(paths.checkpoints, config.checkpoint.keep_last)
        self.elastic = config.parallel.dp == "auto"
        self.sizing = Sizing.of(config, gpus)
        self.failures: list[str] = []
        self.dp: int | None = None

    def run(self) -> None:
        import ray

        from raytron.platform.coordination import LaunchWatcher
        from raytron.platform.worker import layout_of

        while True:
            launch = self.next_launch()
            if launch is None:
                continue
            coordinator = self.actors["coordinator"]
            ray.get(coordinator.reset.remote())
            grow = self.elastic and launch.parallel.dp < self.sizing.max_dp
            watcher = LaunchWatcher(
                coordinator, launch.cluster.workers, self.config.faults.capacity_check_s,
                (lambda dp=launch.parallel.dp: self.sizing.room_to_grow(dp)) if grow else None)
            try:
                worker_group(launch, self.paths, self.gpus, self.actors).fit()
            except Exception as error:  # the group failed: restart it, or give up
                self.failed(failure_gist(error, layout_of(launch)), error)
                continue
            finally:
                watcher.stop()
            step = self.store.latest() or 0
            if step >= self.config.train.steps:
                return
            reason = ray.get(coordinator.stop_reason.remote())
            if reason is None:  # ended early, unasked: a failure, so that it cannot loop
                self.failed(f"the worker group ended at step {step}, before train.steps")
                continue
            self.console.bar.write(f"stopped at step {step}: {reason}; relaunching")
            self.tracking.record_event(self.run_id, "stop", step, f"at step {step}: {reason}")

    def next_launch(self) -> RaytronConfig | None:
        """The config of the next worker group; None after a failure to find room."""
        if not self.elastic:
            return self.config
        f = self.config.faults
        dp = self.sizing.largest_placeable(f.schedule_timeout_s)
        if dp is None:
            self.failed(f"no room for dp={f.min_dp} (faults.min_dp) or more with pp="
                        f"{self.sizing.pp}, tp={self.sizing.tp} within "
                        f"faults.schedule_timeout_s={f.schedule_timeout_s:g}")
            return None
        if self.dp is not None and dp != self.dp:
            step = self.store.latest() or 0
            text = f"dp {self.dp} -> {dp} at step {step} (pp={self.sizing.pp}, tp={self.sizing.tp})"
            self.console.bar.write(f"resizing: {text}")
            self.tracking.record_event(self.run_id, "resize", step, text)
        self.dp = dp
        return with_dp(self.config, dp)

    def failed(self, gist: str, error: BaseException | None = None) -> None:
        """Count a failure: give up past faults.max_restarts, else back off."""
        f = self.config.faults
        step = self.store.latest() or 0
        what = f"{gist} (last committed checkpoint: step {step})"
        self.failures.append(f"failure {len(self.failures) + 1}: {what}")
        self.tracking.record_failure(self.run_id, len(self.failures), step, what)
        if len(self.failures) > f.max_restarts:
            raise RunFailed(f"the worker group failed {len(self.failures)} times, more than "
                            f"faults.max_restarts={f.max_restarts}:\n  "
                            + "\n  ".join(self.failures)) from error
        backoff = min(60.0, f.restart_backoff_s * 2 ** (len(self.failures) - 1))
        self.console.bar.write(f"{self.failures[-1]}\nrestarting from step {step} in "
                               f"{backoff:g} s ({len(self.failures)}/{f.max_restarts})")
        time.sleep(backoff)


def with_dp(config: RaytronConfig, dp: int) -> RaytronConfig:
    """An elastic run's config at one size."""
    p = config.parallel
    return dataclasses.replace(
        config, parallel=dataclasses.replace(p, dp=dp),
        cluster=dataclasses.replace(config.cluster, workers=p.pp * dp * p.tp))


def worker_group(config: RaytronConfig, paths: RunPaths, gpus: float, actors: dict):
    """A Ray Train `TorchTrainer`: one worker per device, each running `train_loop`. Ray
    Train does not restart it (the controller does, from raytron's commit marker); its
    collectives time out shortly after the watchdog would have fired."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytron.platform.faults import FIRST_STEP_GRACE_S
    from raytron.platform.worker import train_loop

    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "checkpoint_dir": str(paths.checkpoints),
                           "launched_at": time.time(), **actors},
        torch_config=TorchConfig(
            timeout_s=int(max(config.faults.hang_timeout_s, FIRST_STEP_GRACE_S)) + 60),
        scaling_config=ScalingConfig(
            num_workers=config.cluster.workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": config.cluster.cpus_per_worker,
                                  **({"GPU": gpus} if gpus else {}),
                                  **config.cluster.worker_resources},
        ),
        run_config=RunConfig(name=config.run.name, storage_path=str(paths.dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=0)),
    )


RANK_SNIPPET = re.compile(r"^\[Rank (\d+) Error Snippet\]:", re.M)
GIST = re.compile(r"(Error|Exception)\b.*: |health check failed|died|killed|timed out", re.I)


def failure_gist(error: BaseException, layout: Layout) -> str:
    """One line per failed rank, with its mesh coordinates, from Ray Train's error."""
    text = str(error)
    pieces = RANK_SNIPPET.split(text)
    if len(pieces) < 3:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return (lines[-1] if lines else type(error).__name__)[:300]
    gists = []
    for rank, snippet in zip(pieces[1::2], pieces[2::2], strict=True):
        lines = [line.strip() for line in snippet.splitlines() if GIST.search(line)]
        gist = lines[-1] if lines else "failed (see its worker log)"
        gists.append(f"{layout.describe(int(rank))}: {gist[:300]}")
    return "; ".join(gists)


def poll(tracker, console: Console, stop: threading.Event, every: float = 0.5) -> None:
    import ray

    while not stop.wait(every):
        console.show(ray.get(tracker.drain.remote()))
