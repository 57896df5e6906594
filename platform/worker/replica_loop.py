"""A worker in replica mode (`faults.mode=replicas`): one data-parallel replica that
trains the whole model in a layout of its own (1x1x1) and meets the other replicas only
in the quorum (`control/quorum.py`) and the sum of their gradients
(`worker/replica_sync.py`).

Each step, the members of its quorum split the global batch in whole micro-batches, so
that every applied step sees the same data, and sum their losses (each its rows' summed
loss over the whole batch's target count) and gradients: the step the uninterrupted run
computes, up to summation order. When a member is lost mid-step no one applies it and
the others compute it again; a replacement loads the last finished step from the
snapshot keepers and joins at the next one. The quorum's leader (its lowest replica)
logs, snapshots and checkpoints for all.
"""

from __future__ import annotations

import dataclasses
import time

import ray
import torch

from raytron.platform.config.layout import Layout
from raytron.platform.config.resolve import replica_config
from raytron.platform.control.quorum import JOIN_WAIT_S, Membership
from raytron.platform.storage import metric_names as names
from raytron.platform.worker.boundary import StopHere
from raytron.platform.worker.faults import FIRST_STEP_GRACE_S, FaultInjector
from raytron.platform.worker.loop import WorkerArgs, WorkerLoop
from raytron.platform.worker.replica_sync import ReplicaSync, StepNotApplied
from raytron.platform.worker.stderr import say
from raytron.platform.worker.trainer import Sequences


class ReplicaLoop(WorkerLoop):
    def __init__(self, args: WorkerArgs, replica: int, local_rank: int):
        whole = args.config
        super().__init__(dataclasses.replace(args, config=replica_config(whole), snapshot=None),
                         0, local_rank)
        self.group_layout = Layout.of(whole)
        self.replica, self.replicas = replica, self.group_layout.dp
        self.joining: str | None = None  # what to say once it is a member
        self.after_loss = False  # it resumed once every replica had been lost
        self.injector = FaultInjector(whole.faults.inject, replica, self.replicas,
                                      self.store.fs, self.store.root, self.describe())
        self.sync = ReplicaSync(args.quorum, replica,
                                max(whole.faults.hang_timeout_s, FIRST_STEP_GRACE_S))
        self.membership: Membership | None = None

    def describe(self) -> str:
        return f"replica {self.replica}"

    def after_a_hang(self) -> str:
        return "Ray Train replaces the replica"

    def leads(self) -> bool:
        if self.membership is None:
            return self.replica == 0
        return self.membership.leader == self.replica

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.sync.close()

    def resume(self) -> tuple[int, dict]:
        """Join the replicas that train, from the snapshot of the step they finished;
        when none trains, start as every replica does: from the newest snapshot the
        keepers hold (each is a whole replica's state), else the last checkpoint."""
        target = self.sync.join()
        say(f"replica {self.replica}: " + ("starts with the others" if target is None else
            f"joins from the snapshot of step {target}"))
        if target is None:  # listed now: the others may have committed more since the launch
            self.args.committed = self.store.committed_steps()
            committed = self.args.committed[-1] if self.args.committed else 0
            if committed >= self.config.train.steps:  # replaced after the others finished
                return committed, {}
            newest = self.snapshots.newest() if self.snapshots else None
            self.args.snapshot = newest if newest is not None and newest > committed else None
            resumed = super().resume()
            self.sync.has_loaded()
            self.after_loss = self.sync.replacing
            return resumed
        if self.snapshots is None:  # the nodes' memory no longer holds them
            raise RuntimeError(f"replica {self.replica} cannot join at step {target + 1}: "
                               "there are no in-memory snapshots to load the state from")
        started = time.perf_counter()
        resumed, problem = self.snapshots.restore(  # the leader may still be handing it over
            target, self.trainer.parts, self.trainer.optimizers,
            lambda: self.sync.snapshot_coming(target))
        if resumed is None:
            raise RuntimeError(f"replica {self.replica} cannot join at step {target + 1}: "
                               f"the snapshot of step {target} {problem}")
        self.trainer.start_at(target)
        self.sync.has_loaded()
        self.joining = (f"replica {self.replica} joined at step {target + 1}, with the state "
                        f"of step {target} from the snapshot keepers "
                        f"({time.perf_counter() - started:.1f} s)")
        return target, resumed.meta

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Step `step + 1` with whichever replicas the quorum has; again, with the new
        quorum, until every member applies it."""
        while True:
            with self.waiting("waited for the other replicas"):
                self.membership = self.sync.arrive(step + 1)
            if self.membership.stop is not None:
                raise StopHere(self.membership.stop)
            if self.joining is not None:  # said once it is a member
                self.args.tracker.note.remote(step, "replicas", self.joining)
                self.joining = None
            if self.after_loss and self.leads():
                self.args.tracker.note.remote(step, "replicas", (
                    f"every replica had been lost: {replicas(list(self.membership.members))} "
                    f"resumed at step {self.membership.step}, from the newest snapshot"))
            elif self.leads():  # a joiner that leads now says it too
                self.changed(self.membership)
            self.after_loss = False
            started = time.perf_counter()
            held = ray.get(self.args.feeder.part.remote(
                step, self.membership.index(self.replica), len(self.membership.members),
                self.config.train.micro_batch))
            batch = Sequences.of(held, self.device)
            wait = time.perf_counter() - started
            try:
                loss, grad_norm = self.trainer.train_step(batch, self.before_update,
                                                          self.summed)
            except StepNotApplied:
                continue
            return loss, grad_norm, wait

    def summed(self, loss: torch.Tensor, parameters: list[torch.nn.Parameter]) -> torch.Tensor:
        with self.waiting("summed gradients with the other replicas"):
            return self.sync.summed(self.membership, loss, parameters)

    def waiting(self, doing: str):
        """The watchdog's budget while the quorum decides: it waits faults.hang_timeout_s
        for a hung replica, and up to JOIN_WAIT_S for a joining one to load."""
        budget = 2 * self.config.faults.hang_timeout_s + JOIN_WAIT_S
        return self.watchdog.busy(doing, budget, "faults.hang_timeout_s")

    def changed(self, now: Membership) -> None:
        """Say who left and who came since the quorum before, once, from the leader."""
        if not now.before or now.before == now.members:
            return
        gone = sorted(set(now.before) - set(now.members))
        came = sorted(set(now.members) - set(now.before))
        changes = [f"{replicas(gone)} lost"] * bool(gone) \
            + [f"{replicas(came)} joined"] * bool(came)
        count = f"{len(now.members)} replica{'s' * (len(now.members) > 1)}"
        then = f"compute step {now.step} again" if now.step == now.before_step \
            else f"from step {now.step} on"
        self.args.tracker.note.remote(now.step, "replicas",
                                      f"{', '.join(changes)}: {count} {then}")

    def launched(self, start: int, startup: dict[str, float], loaded: float) -> None:
        """A launch is the group's start, not a replacement's (joining, or resuming
        once every replica was lost)."""
        if not self.sync.replacing:
            super().launched(start, startup, loaded)

    def replica_metrics(self) -> dict[str, float]:
        return {names.REPLICAS: len(self.membership.members)} if self.membership else {}

    def snapshot(self, step: int, tokens_seen: int) -> None:
        """The leader's state is every member's: one share per step, for the keepers."""
        if self.leads():
            super().snapshot(step, tokens_seen)

    def evaluate(self, step: int) -> None:
        if self.leads():
            super().evaluate(step)

    def score_tasks(self, step: int) -> None:
        if self.leads():
            super().score_tasks(step)

    def save(self, step: int, tokens_seen: int, background: bool = True) -> None:
        if self.leads():
            super().save(step, tokens_seen, background)


def replicas(ids: list[int]) -> str:
    return f"replica{'s' * (len(ids) > 1)} {', '.join(map(str, ids))}"
