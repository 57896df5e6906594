"""Supervising a run's worker groups: relaunch after a failure (from the last committed
checkpoint, with back-off, up to `faults.max_restarts`), after a requested stop (a
resize, a preemption notice), and at the size the cluster has room for (elastic runs)."""

from __future__ import annotations

import dataclasses
import time

from raytron.platform.config.layout import Layout
from raytron.platform.config.plan import make_plan
from raytron.platform.config.resolve import snapshot_layout
from raytron.platform.config.schema import AUTO, REPLICAS, RaytronConfig
from raytron.platform.control.console import Console
from raytron.platform.control.quorum import quorum_actor
from raytron.platform.control.ray_train import (
    StartFrom,
    controller_failed,
    failure_gist,
    fit_beside,
    rank_failures,
    worker_group,
)
from raytron.platform.control.snapshot_keepers import SnapshotKeepers
from raytron.platform.storage.checkpoint import CheckpointStore, CheckpointUnreadable
from raytron.platform.storage.run_dir import RunPaths
from raytron.platform.storage.tracking import RunTracking


class RunFailed(RuntimeError):
    """The worker group failed more than faults.max_restarts times."""


def not_retried() -> tuple[type[BaseException], ...]:
    """Failures no restart can fix: the same checkpoints, data and lease would fail the
    same way. They end the run at once, reported once."""
    from raytron.pipelines.feeder import DataUnusable
    from raytron.pipelines.mixture import DataExhausted
    from raytron.platform.config.schema import ConfigError
    from raytron.platform.storage.lease import LeaseLost
    from raytron.platform.worker.references import ReferencesUnusable

    return (CheckpointUnreadable, DataExhausted, DataUnusable, LeaseLost, ConfigError,
            ReferencesUnusable)


class Supervisor:
    """Runs worker groups until the run is done. After a failure it relaunches from the
    newest whole in-memory snapshot, else the last committed checkpoint, up to
    faults.max_restarts times with doubling back-off;
    after a requested stop (a resize, a preemption notice) it relaunches without counting
    a failure. An elastic run (parallel.dp=auto) relaunches at the largest dp that fits.
    In replica mode Ray Train replaces lost replicas itself; the group relaunches only
    when Ray Train's controller fails (as when two replicas are lost at once)."""

    def __init__(self, config: RaytronConfig, paths: RunPaths, tracking: RunTracking,
                 run_id: str, gpus: float, console: Console, actors: dict,
                 leases: dict[str, str]):
        from raytron.platform.control.capacity import Sizing

        self.config, self.paths, self.tracking, self.run_id = config, paths, tracking, run_id
        self.gpus, self.console, self.actors, self.leases = gpus, console, actors, leases
        self.store = CheckpointStore(paths.checkpoints, config.checkpoint.keep_last)
        self.elastic = config.parallel.dp == AUTO
        self.sizing = Sizing.of(config, gpus)
        self.failures: list[str] = []
        self.dp: int | None = None
        self.keepers = SnapshotKeepers() if config.checkpoint.memory_interval else None
        self.unfit: str | None = None  # why the snapshots are off, when they are

    def run(self) -> None:
        try:
            self.supervise()
        finally:
            if self.keepers is not None:
                self.keepers.close()

    def supervise(self) -> None:
        import ray

        from raytron.platform.control.coordination import LaunchWatcher

        if self.keepers is not None:
            self.keepers.start()  # while the coordinator starts, not after it
        while True:
            launch = self.next_launch()
            if launch is None:
                continue
            coordinator = self.actors["coordinator"]
            ray.get(coordinator.reset.remote())
            actors = self.actors
            if self.config.faults.mode == REPLICAS:
                actors = {**actors, "quorum": quorum_actor(launch)}
            grow = self.elastic and launch.parallel.dp < self.sizing.max_dp
            watcher = LaunchWatcher(
                coordinator, launch.cluster.workers, self.config.faults.capacity_check_s,
                (lambda dp=launch.parallel.dp: self.sizing.room_to_grow(dp)) if grow else None,
                actors.get("quorum"))
            committed = self.store.committed_steps()  # listed once: every rank tries these
            try:
                fit_beside(worker_group(launch, self.paths, self.gpus, actors,
                                        self.leases, committed,
                                        self.start_from(launch, committed)))
            except Exception as error:  # the group failed: restart it, or give up
                raise_if_not_retried(error)
                if "quorum" in actors and not controller_failed(error):
                    # Ray Train replaced lost replicas max_restarts times, then lost one more
                    raise RunFailed(self.replicas_failed(error)) from error
                self.failed(failure_gist(error, Layout.of(launch)), error)
                continue
            finally:
                watcher.stop()
                if "quorum" in actors:
                    ray.kill(actors["quorum"])
            step = self.store.latest() or 0
            if step >= self.config.train.steps:
                return
            ended_by = ray.get(coordinator.run_ended_by.remote())
            if ended_by is not None:
                raise ended_by
            reason = ray.get(coordinator.stop_reason.remote())
            if reason is None:  # ended early, unasked: a failure, so that it cannot loop
                self.failed(f"the worker group ended at step {step}, before train.steps")
                continue
            self.console.write(f"stopped at step {step}: {reason}; relaunching")
            self.tracking.record_event(self.run_id, "stop", step, f"at step {step}: {reason}")

    def start_from(self, launch: RaytronConfig, committed: list[int]) -> StartFrom:
        """The keepers, on every live node, holding only the snapshot the group starts from:
        the newest whole one after the last committed checkpoint, in the group's layout.
        None where the nodes' memory cannot hold the group's snapshots."""
        if self.keepers is None:
            return StartFrom()
        unfit = self.keepers.unfit(make_plan(launch), self.gpus)
        if unfit is not None and unfit != self.unfit:
            self.snapshots_off(unfit)
        self.unfit = unfit
        if unfit is not None:
            return StartFrom()
        keepers = self.keepers.place()
        layout = repr(snapshot_layout(launch))
        snapshot = self.snapshot_after(committed[-1] if committed else 0)
        self.keepers.retain(snapshot, layout)
        return StartFrom(snapshot, keepers)

    def snapshots_off(self, unfit: str) -> None:
        """Say that the next worker groups take no snapshots: the nodes' memory cannot
        hold them (an elastic run may have shrunk)."""
        step = self.store.latest() or 0
        text = (f"in-memory snapshots off (checkpoint.memory_interval="
                f"{self.config.checkpoint.memory_interval}): {unfit}; a restart starts from "
                "the last committed checkpoint")
        self.console.write(text)
        self.tracking.record_event(self.run_id, "snapshots", step, text)

    def snapshot_after(self, step: int) -> int | None:
        """The newest whole in-memory snapshot after `step` in the current layout."""
        if self.keepers is None:
            return None
        layout = snapshot_layout(with_dp(self.config, self.dp) if self.dp else self.config)
        return self.keepers.newest_whole(repr(layout), layout.world, step)

    def next_launch(self) -> RaytronConfig | None:
        """The config of the next worker group; None after a failure to find room."""
        if not self.elastic:
            return self.config
        f, layout = self.config.faults, self.sizing.layout
        dp = self.sizing.largest_placeable(f.schedule_timeout_s)
        if dp is None:
            self.failed(f"no room for dp={f.min_dp} (faults.min_dp) or more with pp="
                        f"{layout.pp}, tp={layout.tp} within "
                        f"faults.schedule_timeout_s={f.schedule_timeout_s:g}")
            return None
        if self.dp is not None and dp != self.dp:
            step = self.store.latest() or 0
            text = f"dp {self.dp} -> {dp} at step {step} (pp={layout.pp}, tp={layout.tp})"
            self.console.write(f"resizing: {text}")
            self.tracking.record_event(self.run_id, "resize", step, text)
        self.dp = dp
        return with_dp(self.config, dp)

    def replicas_failed(self, error: BaseException) -> str:
        """Why a replica-mode run ends: Ray Train replaced lost replicas up to
        faults.max_restarts times, then lost one more (or all at once that often)."""
        step = self.store.latest() or 0
        what = f"{failure_gist(error, Layout.of(self.config))} (last committed checkpoint: " \
            f"step {step})"
        self.tracking.record_failure(self.run_id, self.config.faults.max_restarts + 1, step, what)
        return (f"the replicas failed more than faults.max_restarts="
                f"{self.config.faults.max_restarts} times; the last: {what}")

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
        snapshot = self.snapshot_after(step)
        start = f"step {step}" if snapshot is None else f"step {snapshot} (in-memory snapshot)"
        self.console.write(f"{self.failures[-1]}\nrestarting from {start} in "
                           f"{backoff:g} s ({len(self.failures)}/{f.max_restarts})")
        time.sleep(backoff)


def with_dp(config: RaytronConfig, dp: int) -> RaytronConfig:
    """An elastic run's config at one size."""
    p = config.parallel
    return dataclasses.replace(
        config, parallel=dataclasses.replace(p, dp=dp),
        cluster=dataclasses.replace(config.cluster, workers=Layout.of(config, dp).world))


def raise_if_not_retried(error: BaseException) -> None:
    """No restart can help some failures (`not_retried`): end the run with the first
    rank's, whose message says what happened and what to do."""
    for _, failure in sorted(rank_failures(error).items()):
        if isinstance(failure, not_retried()):
            raise failure from None
