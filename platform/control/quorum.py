"""Replica mode's quorum (`faults.mode=replicas`): which data-parallel replicas compute
each step, agreed in one place so that every replica acts alike.

Before each step every live replica arrives; the quorum forms once each member of the
last one has arrived, died (its heartbeat stopped) or was evicted (it did not arrive
within the hang timeout). The members split the step's global batch among them and sum
their gradients on a group of that membership (its `epoch`); then each votes, and the
update is applied only when every member's sum succeeded, so that a replica lost in the
middle of a step never leaves the others disagreeing: they compute the same step again
without it. A replica that starts while others train (Ray Train replaced it) joins at a
step boundary: the members wait for it to load the state of the step they finished
(from the snapshot keepers), and it takes its share from the next step on. The first
quorum of a worker group waits for every replica to start, but not for one that died
first; a replica that has loaded its state is waited for no longer than a member.

A request to stop the worker group (a node drains, an elastic run can grow) reaches the
quorum too: the next quorum forms as a stop, so that every member stops after the same
step, which the leader commits, and so does every replica that comes later.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

BEAT_S = 0.25  # how often a replica says it is alive
DEAD_AFTER_S = 1.5  # a replica whose heartbeat stopped this long ago has gone
JOIN_WAIT_S = 120.0  # the longest the members wait for a joining replica to load
WAKE_S = 0.1  # how often a waiting call looks at the heartbeats again


@dataclass(frozen=True)
class Membership:
    """The replicas computing `step`, the epoch naming their gradient group, and the
    quorum before (so that whoever leads, a replacement too, can say what changed)."""

    epoch: int
    step: int
    members: tuple[int, ...]  # replica ids (their world ranks), ascending
    before: tuple[int, ...] = ()  # the members of the quorum before (none for the first)
    before_step: int | None = None  # the step that quorum computed
    stop: str | None = None  # why no member computes `step`: all stop after step - 1

    def index(self, replica: int) -> int:
        return self.members.index(replica)

    @property
    def leader(self) -> int:
        """The member that logs, checkpoints and snapshots for all of them."""
        return self.members[0]


class Quorum:
    """Ray actor (threaded: the members wait in it at once), on the controller's node."""

    def __init__(self, expected: int, first_wait_s: float, hang_timeout_s: float):
        self.expected, self.first_wait_s, self.hang_timeout_s = \
            expected, first_wait_s, hang_timeout_s
        self.changed = threading.Condition()
        self.current: Membership | None = None  # the last quorum formed
        self.outcome: bool | None = None  # whether its step was applied (None: not voted)
        self.since = time.monotonic()  # when the current quorum formed or failed
        self.arrivals: dict[int, int] = {}  # replica -> the step it waits to compute
        self.votes: dict[int, bool] = {}  # member -> its sum succeeded (current quorum)
        self.beats: dict[int, float] = {}  # replica -> its last heartbeat
        self.evicted: set[int] = set()
        self.replaced: set[int] = set()  # replicas whose process started since the last quorum
        self.joining: dict[int, int | None] = {}  # replica -> the step it loads (None: not yet)
        self.loaded: dict[int, float] = {}  # replica -> when it loaded its state (not a member)
        self.asked_to_load = 0.0  # when the joiners were last told which step to load
        self.applied: tuple[int, int] | None = None  # the last applied step and its leader
        self.store: Any = None  # the TCP store of the members' gradient groups
        self.stop_reason: str | None = None  # the worker group is asked to stop

    def store_address(self) -> tuple[str, int]:
        """Where the replicas find each other for their gradient groups: a TCP store in
        this actor, which outlives them all (made once, for the first to ask)."""
        import ray
        import torch.distributed as dist

        with self.changed:
            if self.store is None:
                self.store = dist.TCPStore("0.0.0.0", 0, is_master=True,
                                           wait_for_workers=False)
            return ray.util.get_node_ip_address(), self.store.port

    def ask_to_stop(self, reason: str) -> None:
        """Stop the worker group at a step boundary: the next quorum is a stop."""
        with self.changed:
            if self.stop_reason is None:
                self.stop_reason = reason
                self.changed.notify_all()

    def stopping(self) -> bool:
        """The last quorum formed was a stop: nothing is computed any more."""
        return self.current is not None and self.current.stop is not None

    # -- liveness ---------------------------------------------------------------------

    def beat(self, replica: int) -> bool:
        """A replica is alive; False once it was evicted (it must end: Ray Train replaces
        it, and the replacement joins)."""
        with self.changed:
            self.beats[replica] = time.monotonic()
            return replica not in self.evicted

    def alive(self, replica: int) -> bool:
        return replica not in self.evicted \
            and time.monotonic() - self.beats.get(replica, 0.0) < DEAD_AFTER_S

    def still_member(self, replica: int) -> bool:
        """The process that was a member of the last quorum is alive (not a replacement
        of it, which beats under the same id)."""
        return self.alive(replica) and replica not in self.replaced

    def training(self) -> bool:
        """Some member of the last quorum is alive."""
        return self.current is not None \
            and any(self.still_member(m) for m in self.current.members)

    def next_step(self) -> int:
        assert self.current is not None
        return self.current.step + 1 if self.outcome else self.current.step

    # -- joining ----------------------------------------------------------------------

    def welcome(self, replica: int) -> bool:
        """A new process of `replica` starts: the eviction of the one it replaces is over,
        and that one is a member no longer, though the new one beats under its id.
        Whether replicas of this worker group trained before (it replaces one)."""
        with self.changed:
            self.beats[replica] = time.monotonic()
            self.evicted.discard(replica)
            self.loaded.pop(replica, None)
            self.replaced.add(replica)
            return self.current is not None

    def has_loaded(self, replica: int) -> None:
        """A starting or joining replica holds its state: from now on it must arrive
        within the hang timeout, as a member must."""
        with self.changed:
            self.loaded[replica] = time.monotonic()
            self.changed.notify_all()

    def join(self, replica: int) -> int | None:
        """A starting replica: the step whose state it must load (the one the members have
        just finished), once they wait for it; None when no replica trains: it starts from
        the newest snapshot or checkpoint, as all do."""
        with self.changed:
            self.beats[replica] = time.monotonic()
            if not self.training():
                return None
            self.joining[replica] = None
            self.changed.notify_all()
            while self.joining.get(replica) is None and self.training() \
                    and not self.stopping():
                self.changed.wait(WAKE_S)
                self.beats[replica] = time.monotonic()
            if self.joining.get(replica) is None:  # the members have gone meanwhile
                del self.joining[replica]
            return self.joining.get(replica)

    def snapshot_coming(self, step: int) -> bool:
        """Whether the snapshot of `step`, which a joiner loads, may still be on its way:
        the leader that applied `step`, and hands it over in the background, is alive."""
        with self.changed:
            return self.applied is not None and self.applied[0] == step \
                and self.alive(self.applied[1])

    # -- steps ------------------------------------------------------------------------

    def arrive(self, replica: int, step: int) -> Membership | None:
        """Wait for the quorum of `step`; None when this replica is left out of it (it was
        evicted, or it is not where the members are): it must end, and join again."""
        with self.changed:
            now = time.monotonic()
            self.beats[replica] = now
            if not self.training() and not self.arrivals:
                self.since = now  # the first to arrive starts the wait for the others
            self.arrivals[replica] = step
            self.changed.notify_all()
            while replica in self.arrivals:
                if self.stopping():  # the members stopped: so does every later replica
                    self.arrivals.pop(replica, None)
                    return self.current
                if replica in self.evicted or self.training() and step != self.next_step():
                    self.arrivals.pop(replica, None)
                    return None
                if not self.form(step):
                    self.changed.wait(WAKE_S)
                    self.beats[replica] = time.monotonic()
            formed = self.current
            return formed if formed is not None and replica in formed.members else None

    def form(self, step: int) -> bool:
        """Form the quorum of `step` if it can form now (with the lock held); then every
        replica that waited for it leaves `arrivals`, member or not."""
        now = time.monotonic()
        waiting = {r for r, s in self.arrivals.items() if s == step and self.alive(r)}
        self.evict_loaded_but_absent(step, waiting, now)
        if not self.training():  # the first quorum, or every member has gone
            heard = {r for r in self.beats if self.alive(r)}
            gone = len(self.beats) - len(heard)  # died or evicted
            if (heard - waiting or len(waiting) + gone < self.expected) \
                    and now - self.since < self.first_wait_s:
                return False
            members = waiting
        else:
            last = self.current.members
            missing = [m for m in last if self.still_member(m) and m not in waiting]
            if missing:
                if now - self.since < self.hang_timeout_s:
                    return False
                self.evicted.update(missing)  # hung: not waited for any longer
                say(f"step {step}: evicted replicas {missing}: not there within "
                    f"{self.hang_timeout_s:g} s")
            if self.stop_reason is None and not self.joiners_ready(step, waiting):
                return False
            members = {m for m in waiting if m in last or m in self.joining}
        if not members:
            return False
        ordered = tuple(sorted(members))
        for member in ordered:  # a member now, whatever it was
            self.joining.pop(member, None)
            self.loaded.pop(member, None)
            self.replaced.discard(member)
        last_quorum = self.current
        same = last_quorum is not None and ordered == last_quorum.members \
            and self.outcome is True
        epoch = 0 if last_quorum is None else last_quorum.epoch + (0 if same else 1)
        self.current = Membership(epoch, step, ordered,
                                  before=last_quorum.members if last_quorum else (),
                                  before_step=last_quorum.step if last_quorum else None,
                                  stop=self.stop_reason)
        self.outcome = None
        if self.stop_reason is not None:
            say(f"step {step}: replicas {list(ordered)} stop after step {step - 1}: "
                f"{self.stop_reason}")
        elif not same:
            say(f"step {step}: replicas {list(ordered)} (epoch {epoch})")
        self.since, self.votes = now, {}
        for replica in waiting:
            del self.arrivals[replica]
        self.changed.notify_all()
        return True

    def joiners_ready(self, step: int, waiting: set[int]) -> bool:
        """Tell each joining replica to load step - 1; ready once each has loaded it and
        arrived, died, was evicted or took longer than JOIN_WAIT_S to load (it joins at a
        later step)."""
        ready, now = True, time.monotonic()
        for joiner, loads in list(self.joining.items()):
            if not self.alive(joiner):
                del self.joining[joiner]
            elif loads != step - 1:
                self.joining[joiner] = step - 1
                self.loaded.pop(joiner, None)
                say(f"step {step}: replica {joiner} joins once it has loaded step {step - 1}")
                self.asked_to_load = now
                self.changed.notify_all()
                ready = False
            elif joiner not in waiting:
                ready = ready and now - self.asked_to_load > JOIN_WAIT_S
        return ready

    def evict_loaded_but_absent(self, step: int, waiting: set[int], now: float) -> None:
        """Evict the replicas that hold their state (`has_loaded`) but have not arrived
        within the hang timeout since: hung before their first step."""
        late = sorted(r for r, at in self.loaded.items()
                      if r not in waiting and self.alive(r) and now - at > self.hang_timeout_s)
        for replica in late:
            del self.loaded[replica]
            self.joining.pop(replica, None)
            self.evicted.add(replica)
        if late:
            say(f"step {step}: evicted replicas {late}: loaded, but not there within "
                f"{self.hang_timeout_s:g} s")

    def vote(self, replica: int, epoch: int, succeeded: bool) -> bool:
        """Whether the step of `epoch` is applied: only when every member's gradient sum
        succeeded; a member that dies, or hangs, before voting fails it."""
        with self.changed:
            self.beats[replica] = time.monotonic()
            current = self.current
            if current is None or current.epoch != epoch or replica not in current.members:
                return False
            self.votes[replica] = succeeded
            self.changed.notify_all()
            while self.outcome is None and self.current is current:
                missing = [m for m in current.members if m not in self.votes]
                late = time.monotonic() - self.since > self.hang_timeout_s
                if not missing or late or not all(self.still_member(m) for m in missing):
                    self.outcome = not missing and all(self.votes.values())
                    if self.outcome:
                        self.applied = (current.step, current.leader)
                    else:
                        say(f"step {current.step} not applied: votes {self.votes}, "
                            f"no vote from {missing}")
                    if late:
                        self.evicted.update(missing)
                    self.since = time.monotonic()
                    self.changed.notify_all()
                    break
                self.changed.wait(WAKE_S)
                self.beats[replica] = time.monotonic()
            return self.current is current and bool(self.outcome)


def quorum_actor(config: Any) -> Any:
    """The Quorum of one worker group (`config`: its RaytronConfig), on this node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytron.platform.config.layout import Layout
    from raytron.platform.worker.faults import FIRST_STEP_GRACE_S

    replicas = Layout.of(config).dp
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(Quorum).options(
        num_cpus=0, max_concurrency=4 * replicas + 8, scheduling_strategy=here).remote(
        replicas, FIRST_STEP_GRACE_S, config.faults.hang_timeout_s)


def say(text: str) -> None:
    """A line in the run's raytron.log (the actor's output goes there)."""
    print(f"quorum: {text}", file=sys.stderr, flush=True)
