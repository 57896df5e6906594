"""A replica's side of the quorum (`control/quorum.py`, `faults.mode=replicas`): its
heartbeat, the membership of each step, and the sum of the members' gradients on a
group of that membership, voted on before any member applies it.

The group is gloo's over the quorum actor's TCP store, one per membership epoch: gloo
fails at once when a peer's process dies (its sockets close), so a lost replica costs
the others one vote, not a timeout. Gradients travel through host memory.
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Any

import ray
import torch
import torch.distributed as dist

from raytron.platform.control.quorum import BEAT_S, Membership
from raytron.platform.worker.stderr import say


class LeftOut(RuntimeError):
    """The quorum went on without this replica (evicted, or not where the members are):
    it ends, and Ray Train starts a replacement that joins."""


class StepNotApplied(RuntimeError):
    """Some member's sum failed: no member applies the step; they compute it again."""


class ReplicaSync:
    def __init__(self, quorum: Any, replica: int, timeout_s: float):
        self.quorum, self.replica, self.timeout = \
            quorum, replica, datetime.timedelta(seconds=timeout_s)
        host, port = ray.get(quorum.store_address.remote())
        self.store = dist.TCPStore(host, port, is_master=False, timeout=self.timeout)
        self.group: tuple[int, dist.ProcessGroup] | None = None  # (epoch, its gloo group)
        self.replacing = False  # replicas of this worker group trained before this one
        self.stopped = threading.Event()
        self.heart = threading.Thread(target=self.beat, daemon=True)  # from `join` on

    def beat(self) -> None:
        """Every BEAT_S; once the quorum has evicted this replica (it hung), end the
        process, whatever its main thread is stuck in: Ray Train replaces it."""
        while not self.stopped.wait(BEAT_S):
            try:
                kept = ray.get(self.quorum.beat.remote(self.replica), timeout=10 * BEAT_S)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            if not kept:
                say(f"replica {self.replica} was evicted from the quorum (it did not arrive "
                    "at a step in time): ending it, to be replaced")
                os._exit(1)

    def join(self) -> int | None:
        """The step whose state this replica loads from the keepers before it takes part
        (the members wait for it); None when no replica trains yet. Its heartbeat starts
        here: the quorum forgets an eviction of the replica this one replaces."""
        self.replacing = ray.get(self.quorum.welcome.remote(self.replica))
        self.heart.start()
        return ray.get(self.quorum.join.remote(self.replica))

    def snapshot_coming(self, step: int) -> bool:
        return ray.get(self.quorum.snapshot_coming.remote(step))

    def has_loaded(self) -> None:
        """The state `join` named is loaded: the members now wait for this replica only as
        long as for one of them."""
        ray.get(self.quorum.has_loaded.remote(self.replica))

    def arrive(self, step: int) -> Membership:
        membership = ray.get(self.quorum.arrive.remote(self.replica, step))
        if membership is None:
            raise LeftOut(f"replica {self.replica} was left out of the quorum of step {step}")
        return membership

    def summed(self, membership: Membership, loss: torch.Tensor,
               parameters: list[torch.nn.Parameter]) -> torch.Tensor:
        """The members' summed loss, with each parameter's gradient replaced by the
        members' sum; `StepNotApplied` unless every member's sum succeeded."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([loss.detach().reshape(1).float()]
                         + [g.detach().reshape(-1).float() for g in grads]).cpu()
        succeeded = True
        try:
            if len(membership.members) > 1:
                self.group_of(membership).allreduce([flat]).wait()
        except RuntimeError:  # a peer died, or hung past the timeout
            succeeded = False
        if not ray.get(self.quorum.vote.remote(self.replica, membership.epoch, succeeded)):
            self.group = None  # the next membership has a new epoch
            raise StepNotApplied(f"step {membership.step} was not applied by every replica")
        offset = 1
        for parameter, grad in zip(parameters, grads, strict=True):
            part = flat[offset:offset + grad.numel()].view_as(grad)
            parameter.grad = part.to(dtype=grad.dtype, device=grad.device)
            offset += grad.numel()
        return flat[0].to(loss.device)

    def group_of(self, membership: Membership) -> dist.ProcessGroup:
        if self.group is None or self.group[0] != membership.epoch:
            store = dist.PrefixStore(f"epoch-{membership.epoch}", self.store)
            self.group = (membership.epoch, dist.ProcessGroupGloo(
                store, membership.index(self.replica), len(membership.members), self.timeout))
        return self.group[1]

    def close(self) -> None:
        self.stopped.set()
        if self.heart.is_alive():
            self.heart.join()
