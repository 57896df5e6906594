"""The training loop every worker of the group runs (one Ray actor per device).

A worker joins the (pp, dp, tp) mesh, builds its share of the model from the seed,
resumes from the last committed checkpoint if there is one, and trains: each step
pulls its replica's slice of the global batch from the DataFeeder and hands it to the
`Trainer`. Rank 0 reports metrics, the first worker of each node its system metrics;
every rank writes its checkpoint shards. Nothing here depends on the process being the
first of its run: a restarted worker group picks up from the checkpoint exactly where
the last one committed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train.torch
import torch
import torch.distributed as dist

from raytron.pipelines.feeder import DataUnusable
from raytron.pipelines.mixture import DataExhausted, kept, ran_out
from raytron.platform.config.layout import Layout
from raytron.platform.config.resolve import step_flops_per_token
from raytron.platform.config.schema import AUTO, RaytronConfig
from raytron.platform.storage import metric_names as names
from raytron.platform.storage.checkpoint import CheckpointStore, PendingSave, Resumed
from raytron.platform.worker.boundary import StepBoundary, StopHere
from raytron.platform.worker.faults import FaultInjector, Watchdog
from raytron.platform.worker.hardware import (
    limit_compile_workers,
    memory_peaks,
    peak_flops,
    training_device,
)
from raytron.platform.worker.layout import build_mesh, check_tensor_parallel_on_one_node
from raytron.platform.worker.references import (
    REFERENCE_FILE,
    ReferencesUnusable,
    ReferenceTable,
    reference_rows,
    store_table,
    stored_table,
)
from raytron.platform.worker.snapshotting import Snapshotter
from raytron.platform.worker.system_metrics import SystemSampler
from raytron.platform.worker.task_scoring import score_in_layout
from raytron.platform.worker.trainer import Sequences, Trainer

SEND_TIMEOUT_S = 30.0  # the longest a sample of system metrics waits for the tracker


@dataclass
class WorkerArgs:
    config: RaytronConfig
    checkpoint_dir: str  # absolute: workers run in a directory of Ray's choosing
    feeder: Any  # DataFeeder actor handle
    tracker: Any  # Tracker actor handle
    coordinator: Any  # Coordinator actor handle: requests to stop at a step boundary
    launched_at: float  # when the controller launched this worker group (time.time())
    leases: dict[str, str]  # folder -> the run's lease token, checked before each commit
    committed: list[int]  # the committed steps the controller listed: the ones to resume from
    judge: Any = None  # TaskJudge actor handle, when the run scores train.eval_tasks
    keepers: dict[str, Any] | None = None  # node id -> snapshot keeper (memory_interval > 0)
    snapshot: int | None = None  # the step of the in-memory snapshot to resume from, if any
    quorum: Any = None  # Quorum actor handle (faults.mode=replicas)


def train_loop(args: dict) -> None:
    """Ray Train's `train_loop_per_worker`. An exception reaches the controller as it is
    (Ray Train's `WorkerGroupError.worker_failures`), which names the rank."""
    context = ray.train.get_context()
    worker = WorkerArgs(**args)
    worker.coordinator.join.remote(context.get_world_rank(),
                                   ray.get_runtime_context().get_node_id())
    if worker.quorum is not None:
        from raytron.platform.worker.replica_loop import ReplicaLoop

        ReplicaLoop(worker, context.get_world_rank(), context.get_local_rank()).run()
        return
    WorkerLoop(worker, context.get_world_rank(), context.get_local_rank()).run()


class WorkerLoop:
    def __init__(self, args: WorkerArgs, rank: int, local_rank: int):
        self.entered = time.time()
        self.args, self.config = args, args.config
        self.rank, self.local_rank = rank, local_rank
        self.layout = Layout.of(self.config)
        self.group_layout = self.layout  # the whole group's: in replica mode, all replicas'
        self.dp_rank = self.layout.coordinates(rank)["dp"]
        torch.set_num_threads(self.config.cluster.cpus_per_worker)
        if self.config.train.compile:
            limit_compile_workers(self.config.cluster.cpus_per_worker)
        self.device = training_device(ray.train.torch.get_device())
        self.peak_flops = peak_flops(self.device, self.config.train.peak_flops)
        mesh = build_mesh(self.layout, self.device.type)
        if mesh is not None:
            check_tensor_parallel_on_one_node(mesh, ray.get_runtime_context().get_node_id(),
                                              self.layout)
        self.trainer = Trainer(self.config, self.layout, self.device, mesh)
        self.flops_per_token = step_flops_per_token(self.config)
        self.store = CheckpointStore(args.checkpoint_dir, self.config.checkpoint.keep_last,
                                     args.leases)
        self.injector = FaultInjector(self.config.faults.inject, rank, self.layout.world,
                                      self.store.fs, self.store.root, self.layout.describe(rank))
        self.validation: Sequences | None = None
        self.references: ReferenceTable | None = None  # a full fine-tune's DPO reference
        self.task_requests: list | None = None  # train.eval_tasks' pairs, asked once
        self.staged: StagedBatch | None = None  # the next step's batch, fetched early
        self.snapshots = None if not args.keepers else Snapshotter(
            args.keepers, ray.get_runtime_context().get_node_id(), rank, repr(self.layout))
        # in replica mode the quorum says when to stop (StopHere)
        self.boundary = StepBoundary(args.coordinator if args.quorum is None else None, rank)
        self.unsaved: PendingSave | None = None  # written in the background, not committed
        self.committed_step = 0
        self.watchdog: Watchdog | None = None

    def describe(self) -> str:
        """This rank, as failures name it."""
        return self.layout.describe(self.rank)

    def after_a_hang(self) -> str:
        """What follows when the watchdog fails this rank, for its message."""
        return "the run restarts"

    def leads(self) -> bool:
        """Whether this rank logs, and hands the feeder's cursor on, for the group."""
        return self.rank == 0

    def run(self) -> None:
        sampler = self.system_sampler()
        try:
            self.train()
            if self.snapshots is not None:
                self.snapshots.settle()
        finally:
            self.store.close()
            self.boundary.close()
            if self.watchdog is not None:
                self.watchdog.stop()
            if sampler is not None:
                sampler.stop()

    def system_sampler(self) -> SystemSampler | None:
        """The node's system metrics, sampled by one worker per node (local rank 0)."""
        tracking = self.config.tracking
        if self.local_rank != 0 or not tracking.system_metrics:
            return None
        tracker = self.args.tracker
        return SystemSampler(  # each sample waited for: the last one is in before the run ends
            lambda metrics: ray.get(tracker.log_system.remote(metrics), timeout=SEND_TIMEOUT_S),
            tracking.system_metrics_interval_s)

    def train(self) -> None:
        train, faults = self.config.train, self.config.faults
        loading = time.time()
        step, meta = self.resume()
        self.references = self.dpo_references(step)
        loaded = time.time()
        startup = {"group_s": self.entered - self.args.launched_at,  # Ray, processes
                   "build_s": loading - self.entered,  # mesh, model, optimizer
                   "load_s": loaded - loading}  # the checkpoint
        self.committed_step = step
        self.watchdog = watchdog = Watchdog(faults.hang_timeout_s, self.describe(),
                                            self.after_a_hang())
        first_step = step + 1  # logged too, so every (re)start shows where it begins
        tokens_seen = meta.get("tokens_seen", 0)
        tokens_per_step = train.global_batch * self.config.data.seq_len
        window_started, window_wait, window_steps = time.perf_counter(), 0.0, 0
        while step < train.steps:
            if self.snapshots is not None and self.injector.due(step + 1):
                self.snapshots.settle()  # a drill shows recovery from the step just held
            self.injector.at_step(step + 1)
            try:
                loss, grad_norm, wait = self.train_step(step)
            except (DataExhausted, DataUnusable) as error:
                self.end_of_data(step, tokens_seen, error)
                return
            except StopHere:
                with self.saving():
                    self.stop(step, tokens_seen)
                return
            step += 1
            tokens_seen += tokens_per_step
            self.snapshot(step, tokens_seen)
            if step == first_step:
                self.launched(step - 1, startup, loaded)
            watchdog.beat()
            window_wait += wait
            window_steps += 1
            if step % train.log_interval == 0 or step == train.steps or step == first_step:
                step_time = (time.perf_counter() - window_started) / window_steps
                self.report(step, {
                    names.TRAIN_LOSS: loss.item(), "lr": self.trainer.lr,
                    "grad_norm": grad_norm.item(), names.STEP_TIME_S: step_time,
                    names.INPUT_WAIT_S: window_wait / window_steps,
                    names.TOKENS_PER_S: tokens_per_step / step_time,
                    **self.mfu(tokens_per_step / step_time),
                    "tokens_seen": tokens_seen, **self.trainer.pair_statistics(),
                    **self.bubble_metrics(),
                    **self.memory_metrics(),
                    **self.snapshot_metrics(),
                    **self.replica_metrics(),
                }, with_data_stats=True)
                window_started, window_wait, window_steps = time.perf_counter(), 0.0, 0
            if train.eval_interval and (step % train.eval_interval == 0 or step == train.steps):
                with watchdog.busy("was validating", faults.eval_timeout_s,
                                   "faults.eval_timeout_s"):
                    self.evaluate(step)
            if self.args.judge is not None and train.eval_task_interval and (
                    step % train.eval_task_interval == 0 or step == train.steps):
                with watchdog.busy("was scoring train.eval_tasks", faults.eval_task_timeout_s,
                                   "faults.eval_task_timeout_s"):
                    self.score_tasks(step)
            if step % self.config.checkpoint.interval == 0 or step == train.steps:
                with self.saving():
                    self.save(step, tokens_seen)
            decision = self.boundary.agree(self.unsaved is not None and self.unsaved.written())
            if decision.commit and self.unsaved is not None:
                with self.saving():
                    self.commit()
            if decision.stop and step < train.steps:
                with self.saving():
                    self.stop(step, tokens_seen)
                return
            watchdog.beat()
        if self.unsaved is not None:
            with self.saving():
                self.commit()

    def snapshot(self, step: int, tokens_seen: int) -> None:
        """Every checkpoint.memory_interval steps (auto: every step; the controller gave
        no keepers where they do not fit), this rank's state to the keepers, before
        anything else can fail (the data cursor from rank 0, which hands it to the feeder)."""
        interval = self.config.checkpoint.memory_interval
        interval = 1 if interval == AUTO else interval
        if self.snapshots is None or step % interval or step == self.config.train.steps:
            return
        meta = {"tokens_seen": tokens_seen}
        if self.leads():
            meta["cursor"] = ray.get(self.args.feeder.cursor.remote(step))
        self.snapshots.take(step, self.trainer.parts, self.trainer.optimizers, meta,
                            keep=step % self.config.checkpoint.interval == 0)

    def launched(self, start: int, startup: dict[str, float], loaded: float) -> None:
        """Once its first step is done, rank 0 tells the tracker the group's layout and
        how long it took to get going, in parts (an event and a tag, not charts)."""
        if not self.leads():
            return
        now = time.time()
        whole = self.group_layout
        layout = {**whole.sizes(), "workers": whole.world}
        self.args.tracker.launched.remote(start, layout, {
            **startup, "first_step_s": now - loaded, "total_s": now - self.args.launched_at})

    def saving(self):
        """The watchdog's budget for writing or committing a checkpoint."""
        faults = self.config.faults
        return self.watchdog.busy("was saving a checkpoint", faults.checkpoint_timeout_s,
                                  "faults.checkpoint_timeout_s")

    def stop(self, step: int, tokens_seen: int) -> None:
        """Asked to stop (the run resizes, or a node is being preempted): make sure `step`
        is committed, so that the next worker group loses nothing."""
        self.keep_step(step, tokens_seen)
        self.report(step, {"stopped_at_step": step})

    def keep_step(self, step: int, tokens_seen: int) -> None:
        """Commit `step` (collective), and the background save before it."""
        if self.unsaved is not None:
            self.commit()
        if self.committed_step != step:
            self.save(step, tokens_seen, background=False)

    def end_of_data(self, step: int, tokens_seen: int, error: BaseException) -> None:
        """The data cannot give step `step + 1`'s batch, and never will (every rank learns
        it at the same step): commit `step`, then have the controller end the run with why
        and what to do (the group itself ends without an error)."""
        with self.saving():
            self.keep_step(step, tokens_seen)
        if not self.leads():
            return
        if isinstance(error, DataExhausted):
            why: BaseException = ran_out(step, self.config.train.steps)
        else:
            why = DataUnusable(f"{error} (at step {step + 1}; {kept(step)}). Fix: correct the data "
                               "or data.sources, then run the same command again.")
        ray.get(self.args.coordinator.end_run.remote(why))

    def bubble_metrics(self) -> dict[str, float]:
        """The measured idle share of each pipeline rank in the last step (collective over
        the pipeline group: every rank calls it at the same steps)."""
        shares = self.trainer.idle_shares()
        metrics = {f"pipeline/idle_stage{rank}": share for rank, share in enumerate(shares)}
        if shares:
            metrics["pipeline/idle"] = sum(shares) / len(shares)
        return metrics

    def snapshot_metrics(self) -> dict[str, float]:
        """How long rank 0's last in-memory snapshot held training up (`Snapshotter.stall_s`)."""
        if self.snapshots is None or self.snapshots.stall_s is None:
            return {}
        return {names.SNAPSHOT_S: self.snapshots.stall_s}

    def replica_metrics(self) -> dict[str, float]:
        """How many replicas computed the step, in replica mode."""
        return {}

    def mfu(self, tokens_per_s: float) -> dict[str, float]:
        """Model FLOPs utilization over the devices' peak, where one is known (not on CPUs)."""
        if self.peak_flops is None:
            return {}
        return {names.MFU: self.flops_per_token * tokens_per_s
                / (self.layout.world * self.peak_flops)}

    def memory_metrics(self) -> dict[str, float]:
        """Peak memory of the busiest rank since the last logged step, and of the busiest
        rank of each pipeline rank; on GPUs the allocator's peak reservation too
        (collective: every rank calls it at the same steps)."""
        peaks = memory_peaks(self.device)
        if dist.is_initialized():
            every: list[dict | None] = [None] * dist.get_world_size()
            dist.all_gather_object(every, peaks)
        else:
            every = [peaks]
        metrics = {names.PEAK_MEMORY_GB: max(p["peak"] for p in every)}
        if "reserved" in peaks:
            metrics[names.RESERVED_MEMORY_GB] = max(p["reserved"] for p in every)
        if self.layout.pp > 1:
            for pp_rank in range(self.layout.pp):
                metrics[f"{names.PEAK_MEMORY_GB}_pp{pp_rank}"] = max(
                    every[rank]["peak"] for rank in self.layout.ranks_at(pp_rank))
        return metrics

    def resume(self) -> tuple[int, dict]:
        """Load the latest readable committed checkpoint, if any (`CheckpointUnreadable`
        when there are some and none loads), and point the feeder at its cursor."""
        resumed, fallback = self.from_snapshot()
        if resumed is None:
            resumed = self.store.load_latest(self.trainer.parts, self.trainer.optimizers,
                                             self.args.committed)
        step, meta = (resumed.step, resumed.meta) if resumed else (0, {})
        self.trainer.start_at(step)
        if self.leads():
            if resumed:
                ray.get(self.args.tracker.resumed.remote(
                    step, resumed.skipped, step == self.args.snapshot, fallback))
            ray.get(self.args.feeder.seek.remote(step, meta.get("cursor", {})))
        if dist.is_initialized():
            dist.barrier()
        return step, meta

    def from_snapshot(self) -> tuple[Resumed | None, str | None]:
        """The in-memory snapshot the controller chose, loaded on every rank, or on none;
        then why not (the persistent checkpoint follows)."""
        if self.args.snapshot is None or self.snapshots is None:
            return None, None
        resumed, problem = self.snapshots.restore(self.args.snapshot, self.trainer.parts,
                                                  self.trainer.optimizers)
        return resumed, None if problem is None else (
            f"the in-memory snapshot of step {self.args.snapshot} could not be loaded "
            f"({problem}); loading the last committed checkpoint instead")

    def dpo_references(self, step: int) -> ReferenceTable | None:
        """A full fine-tune's DPO reference table (`references.py`): the stored one, or,
        before the first step, computed over every batch the run will train on and the
        held-out set, then stored; the data then starts again from its beginning."""
        train = self.config.train
        if train.objective != "dpo" or train.lora.rank:
            return None
        rows = train.steps * train.global_batch
        stored = stored_table(self.store.fs, self.store.root,
                              rows + self.config.data.val_sequences)
        if stored is not None:
            return stored
        if step > 0:
            raise ReferencesUnusable(
                f"the run is at step {step}, and the DPO reference table it wrote before its "
                f"first step ({REFERENCE_FILE}) is missing from {self.store.root}; trained "
                "weights cannot compute it again. Fix: restore the file from a backup of the "
                "run, or start a new run.name.")
        started = time.perf_counter()
        at = self.layout.coordinates(self.rank)
        head = at["tp"] == 0 and at["cp"] == 0 and at["pp"] == self.layout.pp - 1
        held_out = Sequences.of(ray.get(self.args.feeder.validation.remote(0, 1)),
                                self.device)  # whole on every replica, given by the first
        table = ReferenceTable(
            reference_rows(self.trainer, self.pass_batches(train.steps), rows, head),
            reference_rows(self.trainer, [(0, held_out)] if len(held_out) else [],
                           len(held_out), head and self.dp_rank == 0))
        if self.leads():
            store_table(self.store.fs, self.store.root, table)
            ray.get(self.args.feeder.seek.remote(0, {}))
            self.args.tracker.note.remote(0, "dpo_reference", (
                f"DPO reference: the starting weights' log-probabilities of {rows} rows and "
                f"{len(table.validation)} held-out rows, computed in "
                f"{time.perf_counter() - started:.0f} s before the first step, stored in "
                f"{self.store.root}/{REFERENCE_FILE}"))
        if dist.is_initialized():
            dist.barrier()
        return table

    def pass_batches(self, steps: int):
        """(first row, batch) of this replica's share of each step's batch, until the
        data ends."""
        for step in range(steps):
            try:
                batch = Sequences.of(ray.get(self.request(step)), self.device)
            except (DataExhausted, DataUnusable):
                return  # training stops there too, saying why
            yield step * self.config.train.global_batch + self.dp_rank * len(batch), batch

    def request(self, step: int):
        """An object reference to this replica's slice of step `step`'s batch."""
        return self.args.feeder.batch.remote(step, self.dp_rank, self.layout.dp)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over this replica's slice; returns mean loss, grad norm, wait.

        The next step's batch is requested before this step computes, so that the feeder
        prepares it meanwhile, and fetched and copied to the device once this step's work
        is queued (on a GPU it still computes): the wait is then the feeder falling
        behind, not a round trip to it, and the copy does not hold up the device."""
        batch, wait = self.batch(step)
        if self.references is not None:
            batch = self.references.attach(batch, step * self.config.train.global_batch
                                           + self.dp_rank * len(batch))
        following = self.request(step + 1) if step + 1 < self.config.train.steps else None
        loss, grad_norm = self.trainer.train_step(batch, self.before_update)
        if following is not None:
            self.staged = StagedBatch.fetch(step + 1, following, self.device)
        return loss, grad_norm, wait

    def before_update(self) -> None:
        """What must finish reading the state before a step changes it: a checkpoint's
        copy, the last snapshot's hand-over."""
        if self.unsaved is not None:
            self.unsaved.wait_for_copy()
        if self.snapshots is not None:
            self.snapshots.settle()

    def batch(self, step: int) -> tuple[Sequences, float]:
        """Step `step`'s batch on the device and the time it was waited for."""
        staged, self.staged = self.staged, None
        if staged is None or staged.step != step:
            staged = StagedBatch.fetch(step, self.request(step), self.device)
        return staged.take()

    def evaluate(self, step: int) -> None:
        """Loss and perplexity on the held-out sequences (the same ones every time);
        under DPO its loss and TRL's eval_ statistics on the held-out pairs."""
        if self.validation is None:
            held_out = ray.get(self.args.feeder.validation.remote(self.dp_rank, self.layout.dp))
            self.validation = Sequences.of(held_out, self.device)
            if self.references is not None:
                self.validation = self.references.attach(
                    self.validation, self.dp_rank * len(self.validation), held_out=True)
        if len(self.validation) == 0:
            return
        loss = self.trainer.evaluate(self.validation).item()
        if self.trainer.dpo:
            self.report(step, {names.VAL_LOSS: loss, **{
                f"eval_{name}": value for name, value in self.trainer.eval_statistics.items()}})
            return
        self.report(step, {names.VAL_LOSS: loss,
                           names.VAL_PERPLEXITY: math.exp(min(loss, 50.0))})

    def score_tasks(self, step: int) -> None:
        """train.eval_tasks' requests scored on the weights of step `step`; rank 0 hands
        the scores to the judge, which logs lm_eval's metrics while training goes on."""
        if self.task_requests is None:
            self.task_requests = ray.get(self.args.judge.requests.remote())
        scores = score_in_layout(self.trainer, self.task_requests)
        if self.leads():
            self.args.judge.judge.remote(step, scores, self.args.tracker)

    def save(self, step: int, tokens_seen: int, background: bool = True) -> None:
        """Write `step`'s checkpoint; commit it now, or (checkpoint.async_save) once the
        background write is done. `checkpoint_save_s` is the time training stood still."""
        started = time.perf_counter()
        if self.unsaved is not None:  # the last background write is still going: wait
            self.commit()
        cursor = ray.get(self.args.feeder.cursor.remote(step))
        meta = {"cursor": cursor, "tokens_seen": tokens_seen,
                "layout": self.group_layout.sizes(),
                "time": time.time()}
        background = background and self.config.checkpoint.async_save
        copy = None if self.snapshots is None else self.snapshots.host_copy(step)
        self.unsaved = self.store.write(step, self.trainer.parts, self.trainer.optimizers,
                                        meta, background, copy)  # from the snapshot's, if any
        if not background:
            self.commit()
        self.report(step, {"checkpoint_save_s": time.perf_counter() - started})

    def commit(self) -> None:
        pending, self.unsaved = self.unsaved, None
        self.store.commit(pending, before_commit=lambda: self.injector.at_step(
            pending.step, during_checkpoint=True))
        self.committed_step = pending.step
        self.report(pending.step, {"checkpoint_step": pending.step})

    def report(self, step: int, metrics: dict[str, float], with_data_stats: bool = False) -> None:
        if not self.leads():
            return
        if with_data_stats:
            metrics = {**metrics, **ray.get(self.args.feeder.stats.remote())}
        self.args.tracker.log.remote(step, metrics)


@dataclass
class StagedBatch:
    """A step's batch fetched from the feeder and on its way to the device, or what
    fetching it raised (the data ran out, say), raised when the step takes it."""

    step: int
    batch: Sequences | None
    error: Exception | None
    wait: float

    @classmethod
    def fetch(cls, step: int, reference: Any, device: torch.device) -> StagedBatch:
        started = time.perf_counter()
        try:
            held = ray.get(reference)
        except Exception as error:  # noqa: BLE001 (kept for the step that needs the batch)
            return cls(step, None, error, time.perf_counter() - started)
        wait = time.perf_counter() - started
        return cls(step, Sequences.of(held, device), None, wait)

    def take(self) -> tuple[Sequences, float]:
        if self.error is not None:
            raise self.error
        return self.batch, self.wait
