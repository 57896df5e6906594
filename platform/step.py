"""The math of one optimizer step, free of Ray so that it is tested on plain process groups.

A replica's slice of the global batch is split into micro-batches whose gradients
accumulate (data-parallel sync only on the last one); the loss of each is divided by
the micro-batch count, so a step means the same whatever the micro-batch size and
the number of replicas.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from raytron.model.gpt import cross_entropy


@dataclass
class StepParts:
    model: torch.nn.Module  # the plain model
    wrapped: torch.nn.Module  # the model as parallelized (itself on one rank)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: torch.dtype | None
    dp_size: int

    def autocast_context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def mean_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        if self.dp_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.dp_size
        return value


def train_step(parts: StepParts, tokens: torch.Tensor, micro_batch: int,
               grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step over this replica's `tokens` (sequences of seq_len + 1); returns the loss
    averaged over replicas and the global gradient norm before clipping."""
    micro_batches = tokens.split(micro_batch)
    total = torch.zeros((), device=tokens.device)
    for index, micro in enumerate(micro_batches):
        accumulate_only = index < len(micro_batches) - 1 and parts.wrapped is not parts.model
        sync = parts.wrapped.no_sync() if accumulate_only else contextlib.nullcontext()
        with sync, parts.autocast_context(tokens.device):
            loss = cross_entropy(parts.wrapped(micro[:, :-1]), micro[:, 1:]) / len(micro_batches)
            loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        parts.model.parameters(), grad_clip if grad_clip > 0 else math.inf
    )
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return parts.mean_over_replicas(total), grad_norm
