"""One rank's share of a training run: its model parts, optimizers and step math.

Free of Ray, so that every layout is tested against the single-process run on plain
process groups. A step over a replica's slice of the global batch runs either as
micro-batches with gradient accumulation (no pipeline) or as pipeline-schedule calls
of `parallel.microbatches` micro-batches each; either way the gradient is the mean over
all micro-batches of all replicas, so the math does not depend on the layout.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from raytron.model.gpt import GPT, cross_entropy
from raytron.model.parallelize import ParallelOptions, parallelize
from raytron.model.pipeline import (
    build_schedule,
    cut_stage,
    forward_only,
    rank_stages,
    stage_layers,
    stage_owner,
    stages_per_rank,
)
from raytron.platform.config.resolve import gpt_shape, recompute_every
from raytron.platform.config.schema import RaytronConfig
from raytron.platform.worker.hardware import autocast_dtype
from raytron.platform.worker.layout import Layout
from raytron.platform.worker.optim import apply_hyperparameters, build_optimizer


class Trainer:
    def __init__(self, config: RaytronConfig, layout: Layout, device: torch.device,
                 mesh: DeviceMesh | None):
        self.config, self.layout, self.device, self.mesh = config, layout, device, mesh
        p, train = config.parallel, config.train
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.coordinates = layout.coordinates(rank)
        self.autocast = autocast_dtype(train.precision, device)
        self.loss_parallel = layout.tp > 1 and p.loss_parallel
        self.parts, self.stage_ids, n_stages = self.build_parts()
        options = ParallelOptions(
            sequence_parallel=p.sequence_parallel, loss_parallel=p.loss_parallel,
            activation_checkpointing=recompute_every(train.activation_checkpointing),
            dp_shard=p.dp_shard, param_dtype=self.autocast,
        )
        for part in self.parts:
            parallelize(part, mesh["tp"] if mesh else None,
                        mesh["dp_replicate", "dp_shard"] if mesh else None, options)
        fused = device.type == "cuda"
        self.optimizers = [build_optimizer(part, train, fused=fused) for part in self.parts]
        self.step = 0  # optimizer steps done: where the learning-rate schedule stands
        local = train.global_batch // layout.dp
        self.micro_batches = local // train.micro_batch
        per_call = p.microbatches or self.micro_batches
        self.call_size = per_call * train.micro_batch  # sequences per pipeline-schedule call
        self.first = 0 in self.stage_ids
        self.last = n_stages - 1 in self.stage_ids
        self.schedule = None
        self.n_stages = n_stages
        self.busy = BusyTimer(device)
        if layout.pp > 1:
            stages = [PipelineStage(part, stage, n_stages, device, group=mesh["pp"].get_group())
                      for part, stage in zip(self.parts, self.stage_ids, strict=True)]
            for stage in stages:
                self.busy.watch(stage)
            scale = 1 / self.micro_batches  # the step's gradient: mean over its micro-batches
            self.schedule = build_schedule(stages, p.schedule, per_call,
                                           lambda out, target: cross_entropy(out, target) * scale)

    def build_parts(self) -> tuple[list[GPT], list[int], int]:
        """This rank's pipeline stages (the whole model without a pipeline), materialized
        and initialized from the seed, or from model.init_from: the same values whatever
        the layout."""
        p = self.config.parallel
        with torch.device("meta"):
            whole = GPT(gpt_shape(self.config.model))
        if self.layout.pp == 1:
            parts, stage_ids, n_stages = [whole], [0], 1
        else:
            n_stages = self.layout.pp * stages_per_rank(p.schedule, p.virtual_stages)
            ranges = stage_layers(self.config.model.n_layers, n_stages, p.layers_per_stage)
            stage_ids = rank_stages(p.schedule, self.coordinates["pp"], self.layout.pp,
                                    p.virtual_stages)
            parts = [cut_stage(whole, s, n_stages, ranges[s]) for s in stage_ids]
        for part in parts:
            part.to_empty(device=self.device)  # one tensor per module: unties
            part.tie_weights()
            part.init_weights(self.config.train.seed)
        if self.config.model.init_from:
            from raytron.platform.models.initial import load_initial_weights

            load_initial_weights(parts, self.config.model.init_from)
        return parts, stage_ids, n_stages

    def parameters(self) -> list[torch.nn.Parameter]:
        return [param for part in self.parts for param in part.parameters()]

    def context(self):
        """Autocast and, under tensor parallelism, the vocab-sharded loss."""
        stack = contextlib.ExitStack()
        if self.autocast is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast))
        if self.loss_parallel:
            stack.enter_context(loss_parallel())
        return stack

    def train_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this replica's slice (sequences of seq_len + 1; every
        rank of the replica passes it, each stage uses what it needs). Returns the mean
        loss over all replicas and the global gradient norm before clipping."""
        if self.schedule is None:
            loss = self.accumulate(tokens)
        else:
            loss = self.pipeline_accumulate(tokens)
        grad_norm = self.clip_gradients(self.config.train.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.start_at(self.step + 1)
        return self.mean_over_replicas(loss), grad_norm

    def start_at(self, step: int) -> None:
        """Continue after `step` optimizer steps (after loading a checkpoint, too), with the
        config's hyperparameters and the learning rate its schedule gives there."""
        self.step = step
        for optimizer in self.optimizers:
            apply_hyperparameters(optimizer, self.config.train, step)

    def accumulate(self, tokens: torch.Tensor) -> torch.Tensor:
        micro_batches = tokens.split(self.config.train.micro_batch)
        total = torch.zeros((), device=self.device)
        for index, micro in enumerate(micro_batches):
            self.sync_gradients(index == len(micro_batches) - 1)
            with self.context():
                loss = cross_entropy(self.parts[0](micro[:, :-1]), micro[:, 1:])
                (loss / len(micro_batches)).backward()
            total += local_value(loss).detach() / len(micro_batches)
        return total

    def pipeline_accumulate(self, tokens: torch.Tensor) -> torch.Tensor:
        """Schedule calls of `call_size` sequences; only the last stage sees losses."""
        calls = self.micro_batches * self.config.train.micro_batch // self.call_size
        total = torch.zeros((), device=self.device)
        self.busy.start()
        for call in range(calls):
            self.sync_gradients(call == calls - 1)
            losses: list[torch.Tensor] = []
            with self.context():
                self.schedule.step(*self.stage_inputs(tokens, call), losses=losses,
                                   **self.stage_targets(tokens, call))
            if self.last:  # losses come scaled by 1/micro-batches: their sum is the mean
                total += torch.stack([local_value(x).detach() for x in losses]).sum()
        self.busy.stop()
        return self.sum_over_stages(total)

    def idle_shares(self) -> list[float]:
        """Share of the last step each pipeline rank spent waiting (the measured bubble),
        for this rank's pipeline; empty without a pipeline."""
        if self.schedule is None:
            return []
        shares: list[float | None] = [None] * self.layout.pp
        dist.all_gather_object(shares, self.busy.idle_share(), group=self.mesh["pp"].get_group())
        return shares

    def stage_inputs(self, tokens: torch.Tensor, call: int) -> tuple:
        if not self.first:
            return ()
        return (tokens[call * self.call_size : (call + 1) * self.call_size, :-1],)

    def stage_targets(self, tokens: torch.Tensor, call: int) -> dict:
        if not self.last:
            return {}
        return {"target": tokens[call * self.call_size : (call + 1) * self.call_size, 1:]}

    def sync_gradients(self, now: bool) -> None:
        """FSDP reduces gradients only after the last micro-batch of a step."""
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(now)

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean loss over this replica's held-out sequences, averaged over replicas."""
        for part in self.parts:
            part.eval()
        if self.schedule is None:
            chunks = tokens.split(self.config.train.micro_batch)
            with self.context():
                total = sum(local_value(cross_entropy(self.parts[0](c[:, :-1]), c[:, 1:]))
                            * len(c) for c in chunks) / len(tokens)
        else:
            total = self.pipeline_evaluate(tokens)
        for part in self.parts:
            part.train()
        return self.mean_over_replicas(total)

    def pipeline_evaluate(self, tokens: torch.Tensor) -> torch.Tensor:
        """Forward-only through the stages, one micro-batch at a time."""
        p, micro = self.config.parallel, self.config.train.micro_batch
        tp = self.layout.tp
        seq = self.config.data.seq_len // (tp if p.sequence_parallel and tp > 1 else 1)
        parts = dict(zip(self.stage_ids, self.parts, strict=True))
        total = torch.zeros((), device=self.device)
        for chunk in tokens.split(micro):
            with self.context():
                loss = forward_only(
                    parts, self.n_stages, lambda s: stage_owner(p.schedule, s, self.layout.pp),
                    self.coordinates["pp"], self.mesh["pp"].get_group(), chunk[:, :-1],
                    (len(chunk), seq, self.config.model.d_model),
                    lambda logits, y=chunk[:, 1:]: cross_entropy(logits, y))
            if loss is not None:
                total += local_value(loss) * len(chunk) / len(tokens)
        return self.sum_over_stages(total)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """The gradient norm over every parameter of every rank; clipped to `max_norm`."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        squares = torch.zeros((), device=self.device)
        for group in group_by_mesh(grads):
            norm = torch.nn.utils.get_total_norm(group, foreach=True)
            squares += local_value(norm) ** 2
        squares = self.sum_over_stages(squares)
        norm = squares.sqrt()
        if max_norm > 0:
            scale = max_norm / (norm.item() + 1e-6)
            if scale < 1:
                for grad in grads:
                    grad.mul_(scale)
        return norm

    def sum_over_stages(self, value: torch.Tensor) -> torch.Tensor:
        if self.layout.pp > 1:
            dist.all_reduce(value, group=self.mesh["pp"].get_group())
        return value

    def mean_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        if self.layout.dp > 1:
            dist.all_reduce(value, group=self.mesh["dp"].get_group())
            value = value / self.layout.dp
        return value

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]


class BusyTimer:
    """Time a pipeline rank computes (forward and backward chunks of its stages) within
    a step; the rest of the step it waits on other stages. Synchronizes the GPU around
    each chunk, which costs a little overlap, for a measurement that means something."""

    CHUNK_METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self, device: torch.device):
        self.device = device
        self.busy = self.started = self.elapsed = 0.0

    def watch(self, stage: PipelineStage) -> None:
        for name in self.CHUNK_METHODS:
            setattr(stage, name, self.timed(getattr(stage, name)))

    def timed(self, method):
        def run(*args, **kwargs):
            self.synchronize()
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.synchronize()
                self.busy += time.perf_counter() - started
        return run

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.synchronize()
        self.busy, self.started = 0.0, time.perf_counter()

    def stop(self) -> None:
        self.synchronize()
        self.elapsed = time.perf_counter() - self.started

    def idle_share(self) -> float:
        return max(0.0, 1 - self.busy / self.elapsed) if self.elapsed else 0.0


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value; a tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def group_by_mesh(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Gradients sharing a mesh (or plain ones) can be normed together."""
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    return list(groups.values())
