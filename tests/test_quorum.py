"""Replica mode's quorum, called from threads as the replicas' calls reach the actor: a
step is applied only when every member's sum succeeded; a dead member fails the step
and the others compute it again without it; a hung one is evicted; a replacement loads
the step the members finished and joins at the next one."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from raytron.platform.control import quorum as quorum_module
from raytron.platform.control.quorum import Membership, Quorum


class Beats:
    """Each replica's heartbeat, as its background thread sends it, until it stops."""

    def __init__(self, quorum: Quorum, replicas: list[int]):
        self.quorum, self.stopped = quorum, {r: threading.Event() for r in replicas}
        self.threads = [threading.Thread(target=self.beat, args=(r,), daemon=True)
                        for r in replicas]
        for thread in self.threads:
            thread.start()

    def beat(self, replica: int) -> None:
        while not self.stopped[replica].wait(0.05):
            self.quorum.beat(replica)

    def add(self, replica: int) -> None:
        self.stopped[replica] = threading.Event()
        threading.Thread(target=self.beat, args=(replica,), daemon=True).start()

    def stop(self, replica: int | None = None) -> None:
        for r, event in self.stopped.items():
            if replica is None or r == replica:
                event.set()


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(quorum_module, "DEAD_AFTER_S", 0.4)
    monkeypatch.setattr(quorum_module, "WAKE_S", 0.02)


@contextlib.contextmanager
def running(replicas: list[int], expected: int, hang_timeout_s: float = 30,
            first_wait_s: float = 5) -> Iterator[tuple[Quorum, Beats, ThreadPoolExecutor]]:
    """A quorum, the heartbeats of `replicas`, and threads for their calls."""
    quorum = Quorum(expected, first_wait_s, hang_timeout_s)
    beats = Beats(quorum, replicas)
    try:
        with ThreadPoolExecutor(8) as pool:
            yield quorum, beats, pool
    finally:
        beats.stop()


def arrive_all(pool, quorum, replicas, step) -> dict[int, Membership | None]:
    futures = {r: pool.submit(quorum.arrive, r, step) for r in replicas}
    return {r: f.result(timeout=10) for r, f in futures.items()}


def vote_all(pool, quorum, votes: dict[int, bool], epoch: int) -> dict[int, bool]:
    futures = {r: pool.submit(quorum.vote, r, epoch, ok) for r, ok in votes.items()}
    return {r: f.result(timeout=10) for r, f in futures.items()}


def test_a_lost_member_fails_its_step_and_the_others_compute_it_again_without_it():
    with running([0, 1, 2], 3) as (quorum, beats, pool):
        formed = arrive_all(pool, quorum, [0, 1, 2], 1)
        assert set(formed.values()) == {Membership(0, 1, (0, 1, 2))}
        assert vote_all(pool, quorum, {0: True, 1: True, 2: True}, 0) == {0: True, 1: True,
                                                                           2: True}
        assert arrive_all(pool, quorum, [0, 1, 2], 2)[0] == \
            Membership(0, 2, (0, 1, 2), before=(0, 1, 2), before_step=1)
        beats.stop(2)  # dies computing step 2: the others' sums fail
        started = time.monotonic()
        assert vote_all(pool, quorum, {0: False, 1: False}, 0) == {0: False, 1: False}
        assert time.monotonic() - started < 1.5  # its heartbeat, not a timeout
        again = arrive_all(pool, quorum, [0, 1], 2)
        assert set(again.values()) == {Membership(1, 2, (0, 1), before=(0, 1, 2), before_step=2)}
        assert vote_all(pool, quorum, {0: True, 1: True}, 1) == {0: True, 1: True}
        assert arrive_all(pool, quorum, [0, 1], 3)[1] == \
            Membership(1, 3, (0, 1), before=(0, 1), before_step=2)


def test_a_step_is_applied_only_when_every_members_sum_succeeded():
    with running([0, 1], 2) as (quorum, beats, pool):
        arrive_all(pool, quorum, [0, 1], 1)
        assert vote_all(pool, quorum, {0: True, 1: False}, 0) == {0: False, 1: False}
        assert set(arrive_all(pool, quorum, [0, 1], 1).values()) == {
            Membership(1, 1, (0, 1), before=(0, 1), before_step=1)}
        assert quorum.arrive(0, 5) is None  # not where the members are


def test_a_hung_member_is_evicted_and_told_so():
    with running([0, 1, 2], 3, hang_timeout_s=0.5) as (quorum, beats, pool):
        arrive_all(pool, quorum, [0, 1, 2], 1)
        vote_all(pool, quorum, {0: True, 1: True, 2: True}, 0)
        started = time.monotonic()  # 2 beats on, but never arrives at step 2
        assert set(arrive_all(pool, quorum, [0, 1], 2).values()) == {
            Membership(1, 2, (0, 1), before=(0, 1, 2), before_step=1)}
        assert 0.4 < time.monotonic() - started < 3
        assert quorum.beat(2) is False and quorum.beat(0) is True
        quorum.welcome(2)  # its replacement starts
        assert quorum.beat(2) is True


def test_a_replacement_loads_the_finished_step_and_joins_at_the_next():
    """The members wait for it; the step's snapshot is awaited while the leader that
    takes it lives."""
    with running([0, 1], 2) as (quorum, beats, pool):
        arrive_all(pool, quorum, [0, 1], 1)
        vote_all(pool, quorum, {0: True, 1: True}, 0)
        beats.add(2)
        joined = pool.submit(quorum.join, 2)
        time.sleep(0.2)
        assert not joined.done()  # told at the members' next boundary
        members = {r: pool.submit(quorum.arrive, r, 2) for r in (0, 1)}
        assert joined.result(timeout=10) == 1  # the state of step 1, from the keepers
        time.sleep(0.2)
        assert not members[0].done()  # the members wait for it to load
        formed = Membership(1, 2, (0, 1, 2), before=(0, 1), before_step=1)
        assert quorum.snapshot_coming(1)  # its leader, 0, may still be handing it over
        assert quorum.arrive(2, 2) == formed  # the leader says who joined
        assert {f.result(timeout=10) for f in members.values()} == {formed}
        beats.stop(0)
        time.sleep(0.5)
        assert not quorum.snapshot_coming(1)  # its leader died: it never comes


def test_a_request_to_stop_stops_every_member_and_every_later_replica_at_one_step():
    """Asked mid-step, the quorum lets the step be applied and forms the next as a stop
    for all members (a joiner being waited for is not); whoever comes later stops too."""
    with running([0, 1], 2) as (quorum, beats, pool):
        arrive_all(pool, quorum, [0, 1], 1)
        beats.add(2)
        joined = pool.submit(quorum.join, 2)
        quorum.ask_to_stop("node abc is being preempted")
        assert vote_all(pool, quorum, {0: True, 1: True}, 0) == {0: True, 1: True}
        stop = Membership(0, 2, (0, 1), before=(0, 1), before_step=1,
                          stop="node abc is being preempted")
        assert set(arrive_all(pool, quorum, [0, 1], 2).values()) == {stop}
        assert joined.result(timeout=2) is None  # not told to load: nothing trains on
        assert quorum.arrive(2, 1) == stop  # it stops as well, at whatever step
        quorum.ask_to_stop("another reason")  # the first one holds
        assert quorum.arrive(0, 2).stop == "node abc is being preempted"


def test_a_replacement_that_loaded_but_hangs_is_evicted_after_the_hang_timeout():
    """Loading may take up to JOIN_WAIT_S; once loaded, a joiner that does not arrive is
    waited for no longer than a hung member."""
    with running([0, 1], 2, hang_timeout_s=0.5) as (quorum, beats, pool):
        arrive_all(pool, quorum, [0, 1], 1)
        vote_all(pool, quorum, {0: True, 1: True}, 0)
        beats.add(2)
        joined = pool.submit(quorum.join, 2)
        members = {r: pool.submit(quorum.arrive, r, 2) for r in (0, 1)}
        assert joined.result(timeout=10) == 1
        time.sleep(1.0)
        assert not members[0].done()  # loading: waited for
        quorum.has_loaded(2)  # ... and then hangs
        started = time.monotonic()
        assert {f.result(timeout=10) for f in members.values()} == {
            Membership(0, 2, (0, 1), before=(0, 1), before_step=1)}
        assert 0.4 < time.monotonic() - started < 3
        assert quorum.beat(2) is False  # told to end, to be replaced


def test_the_replacement_of_the_last_member_does_not_wait_for_itself():
    """The last member dies and its replacement starts before the heartbeat has gone
    quiet: no one trains, so it starts from the newest snapshot at once."""
    with running([0], 1) as (quorum, beats, pool):
        arrive_all(pool, quorum, [0], 1)
        vote_all(pool, quorum, {0: True}, 0)
        beats.stop(0)
        quorum.welcome(0)
        beats.add(0)
        assert pool.submit(quorum.join, 0).result(timeout=2) is None


def test_the_first_quorum_waits_for_every_replica_then_starts_with_those_there():
    with running([0, 1], 3, first_wait_s=0.5) as (quorum, _, pool):
        assert quorum.join(0) is None  # nobody trains: start from the checkpoint
        started = time.monotonic()
        assert set(arrive_all(pool, quorum, [0, 1], 5).values()) == {Membership(0, 5, (0, 1))}
        assert time.monotonic() - started >= 0.5


@pytest.mark.parametrize("fate", ["hangs", "dies"])
def test_a_replica_lost_before_the_first_quorum_is_not_waited_for(fate):
    """At a launch the others wait up to first_wait_s for every replica to arrive, but
    not for one that died, and for one that has loaded its state and hangs only the hang
    timeout."""
    with running([0, 1, 2], 3, hang_timeout_s=0.5, first_wait_s=30) as (quorum, beats, pool):
        quorum.welcome(2)  # it started,
        quorum.has_loaded(2)  # loaded, and never arrives
        if fate == "dies":
            beats.stop(2)
        started = time.monotonic()
        assert set(arrive_all(pool, quorum, [0, 1], 1).values()) == {Membership(0, 1, (0, 1))}
        assert time.monotonic() - started < 3
        if fate == "hangs":
            assert time.monotonic() - started > 0.4
            assert quorum.beat(2) is False
