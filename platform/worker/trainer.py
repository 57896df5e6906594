"""One rank's share of a training run: its model parts, optimizers and step math.

Free of Ray, so that every layout is tested against the single-process run on plain
process groups. A step over a replica's slice of the global batch runs either as
micro-batches with gradient accumulation (no pipeline) or as pipeline-schedule calls
of `parallel.microbatches` micro-batches each. Either way the loss is the sum over the
learned tokens of the whole global batch divided by their count, whichever replica,
micro-batch or stage holds them, so the math does not depend on the layout; with
fine-tuning's masked tokens a mean of per-micro-batch means would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from raytron.model.attention import Documents
from raytron.model.dpo import STATISTICS, pair_losses, statistic_means
from raytron.model.gpt import GPT, IGNORE
from raytron.model.lora import adapters_off, with_adapter_values
from raytron.model.materialize import materialize
from raytron.model.parallelize import ParallelOptions, parallelize
from raytron.model.pipeline import build_schedule, cut_stage, forward_only, tied_copies
from raytron.model.ring_attention import shard_indices
from raytron.model.stages import stage_layers
from raytron.pipelines.packing import Batch
from raytron.platform.config.layout import Layout
from raytron.platform.config.resolve import (
    recompute_every,
    selective_recompute,
    trained_model,
)
from raytron.platform.config.schema import RaytronConfig
from raytron.platform.worker.hardware import autocast_dtype
from raytron.platform.worker.optim import apply_hyperparameters, build_optimizer

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

# a step's loss and trained parameters -> the loss summed with other replicas', their
# gradients summed in place (`worker/replica_sync.py`)
Combine = Callable[[torch.Tensor, list[torch.nn.Parameter]], torch.Tensor]


@dataclass
class Sequences:
    """A replica's share of a batch as the model reads it (or a context-parallel rank's
    share of that: some tokens of each sequence, `order` saying which)."""

    inputs: torch.Tensor  # (rows, seq)
    labels: torch.Tensor  # (rows, seq): the next token, or IGNORE where nothing is learned
    positions: torch.Tensor | None  # (rows, seq) per-sample positions: document masking
    target_count: int  # labels that are not IGNORE in the whole global batch
    order: torch.Tensor | None = None  # (rows, seq) each token's index in its sequence
    documents: torch.Tensor | None = None  # (rows, seq) with order: each token's sample
    # (rows, 2) DPO: each row's log-probability under the reference model and its count
    # of learned tokens (0: a padding row), over the whole row whatever the shard
    reference: torch.Tensor | None = None

    @classmethod
    def of(cls, batch: Batch, device: torch.device) -> Sequences:
        """The batch on `device`; its copies started, not waited for (see `to_device`)."""
        tokens = to_device(batch.tokens, device)
        labels = tokens[:, 1:]
        if batch.targets is not None:
            labels = labels.masked_fill(~to_device(batch.targets[:, 1:], device).bool(), IGNORE)
        positions = None if batch.positions is None else \
            to_device(batch.positions[:, :-1], device)
        return cls(tokens[:, :-1], labels, positions, max(batch.target_count, 1))

    def __len__(self) -> int:
        return len(self.inputs)

    def context_shard(self, cp: int, rank: int) -> Sequences:
        """Context-parallel rank `rank`'s tokens of each sequence (head-and-tail chunks),
        with their indices and, under document masking, their samples' ids, which only
        the whole sequence tells."""
        index = shard_indices(self.inputs.shape[1], cp, rank).to(self.inputs.device)
        documents = None if self.positions is None else \
            Documents.ids_of(self.positions)[:, index]
        return Sequences(self.inputs[:, index], self.labels[:, index],
                         None if self.positions is None else self.positions[:, index],
                         self.target_count, index.expand(len(self), -1), documents,
                         self.reference)

    def per_token(self) -> dict[str, torch.Tensor]:
        """The model's inputs beside the tokens: (rows, seq) each, None ones left out."""
        given = {"positions": self.positions, "order": self.order,
                 "documents": self.documents}
        return {name: value for name, value in given.items() if value is not None}

    def split(self, size: int) -> list[Sequences]:
        """Micro-batches of `size` rows, the last one padded with rows that learn nothing:
        every micro-batch has one shape, so a compiled model never compiles again for a
        smaller last one (held-out sets rarely divide evenly)."""
        count = -(-len(self) // size)
        return [self.rows(i * size, (i + 1) * size).padded(size) for i in range(count)]

    def rows(self, start: int, stop: int) -> Sequences:
        return self.replaced(lambda tensor: tensor[start:stop])

    def replaced(self, change: Callable[[torch.Tensor], torch.Tensor],
                 labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reference: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> Sequences:
        """These sequences with `change` applied to every per-row tensor (`labels` to the
        labels, `reference` to the reference, when given)."""
        given = {name: change(value) for name, value in self.per_token().items()}
        return Sequences(change(self.inputs), (labels or change)(self.labels),
                         target_count=self.target_count, **{"positions": None, **given},
                         reference=None if self.reference is None
                         else (reference or change)(self.reference))

    def padded(self, size: int) -> Sequences:
        """`size` rows: these, then copies of the first row whose labels are all IGNORE."""
        missing = size - len(self)
        if missing <= 0:
            return self

        def extend(rows: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
            return torch.cat([rows, fill.expand(missing, -1)])

        return self.replaced(lambda rows: extend(rows, rows[:1]),
                             lambda labels: extend(labels, torch.full_like(labels[:1], IGNORE)),
                             lambda reference: extend(reference, torch.zeros_like(reference[:1])))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 tensor on `device` from a host array of ids, positions or flags, copied
    as int32 (half the bytes) and cast there. On a GPU from pinned memory (torch's caching
    host allocator reuses it once the copy is done) without blocking the host: a step's
    batch is copied while the step before it still computes."""
    host = torch.empty(array.shape, dtype=torch.int32, pin_memory=device.type == "cuda")
    host.numpy()[...] = array  # a copy: Ray's object store hands out read-only arrays
    return host.to(device, non_blocking=True).long()


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
        self.optimizers = [build_optimizer(part, train) for part in self.parts]
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
            from torch.distributed.pipelining import PipelineStage  # ~1 s: only when needed

            stages = [PipelineStage(part, stage, n_stages, device, group=mesh["pp"].get_group())
                      for part, stage in zip(self.parts, self.stage_ids, strict=True)]
            for stage in stages:
                self.busy.watch(stage)
            self.schedule = build_schedule(stages, p.schedule, per_call, self.scaled_loss)
        self.loss_scale = 1.0  # set by each train_step: dp / the global batch's target count
        # DPO: its settings, and the sums of `STATISTICS` over this rank's pairs of the
        # last step; the loss of a pair is every context shard's (they add up its row)
        self.dpo = train.dpo if train.objective == "dpo" else None
        self.pair_sums = torch.zeros(len(STATISTICS), device=device)
        self.eval_statistics: dict[str, float] = {}
        self.loss_copies = layout.cp if self.dpo else 1
        self.tied = tied_copies(self.parts)
        self.tied_group = self.tied_embedding_group()

    def build_parts(self) -> tuple[list[GPT], list[int], int]:
        """This rank's pipeline stages (the whole model without a pipeline): built on the
        meta device, parallelized, then materialized holding only this rank's shards,
        initialized from the seed or from model.init_from: the same values whatever the
        layout."""
        p, train = self.config.parallel, self.config.train
        whole = trained_model(self.config)
        n_stages = self.layout.stages
        stage_ids = self.layout.rank_stages(self.coordinates["pp"])
        if n_stages == 1:
            parts = [whole]
        else:
            ranges = stage_layers(self.config.model.n_layers, n_stages, p.layers_per_stage)
            parts = [cut_stage(whole, s, n_stages, ranges[s]) for s in stage_ids]
        options = ParallelOptions(
            sequence_parallel=p.sequence_parallel, loss_parallel=p.loss_parallel,
            activation_checkpointing=recompute_every(train.activation_checkpointing),
            selective_recompute=selective_recompute(train.activation_checkpointing),
            compile=train.compile, dp_shard=p.dp_shard, param_dtype=self.autocast,
        )
        mesh = self.mesh
        for part in parts:
            parallelize(part, mesh["tp"] if mesh else None,
                        mesh["dp_replicate", "dp_shard_cp"] if mesh else None, options,
                        mesh["cp"] if mesh else None)
        initial = partial(whole.initial_value, train.seed)
        if self.config.model.init_from:
            from raytron.platform.models.initial import initial_weights

            initial = initial_weights(parts, self.config.model.init_from)
        if train.lora.rank:
            initial = with_adapter_values(initial, train.seed)
        for part in parts:
            materialize(part, self.device, initial)
            part.init_rope()
        return parts, stage_ids, n_stages

    def tied_embedding_group(self) -> dist.ProcessGroup | None:
        """Under a pipeline, a tied embedding matrix has a copy on the first stage and one
        on the last: the process group joining the two ranks of each (dp, tp) coordinate
        that hold them (None for ranks holding neither, or both). Collective."""
        layout = self.layout
        if layout.pp == 1 or not self.config.model.tie_embeddings:
            return None
        first, last = layout.stage_owner(0), layout.stage_owner(self.n_stages - 1)
        if first == last:
            return None
        pairs = [list(pair) for pair in zip(layout.ranks_at(first), layout.ranks_at(last),
                                            strict=True)]
        return dist.new_subgroups_by_enumeration(pairs)[0]

    def sum_tied_gradients(self) -> None:
        """Give both copies of a pipeline-split tied embedding the sum of their gradients,
        as the single matrix of the unsplit model gets: they stay equal."""
        grads = [local_part(copy.grad) for copy in self.tied if copy.grad is not None]
        if not grads:
            return
        total = torch.stack(grads).sum(0)
        if self.tied_group is not None:
            dist.all_reduce(total, group=self.tied_group)
        for grad in grads:
            grad.copy_(total)

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

    def train_step(self, batch: Sequences, before_update: Callable[[], None] | None = None,
                   combine: Combine | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this replica's share of the global batch (every rank of
        the replica passes it, each stage uses what it needs). Returns the loss over the
        whole global batch and the global gradient norm before clipping. `before_update`
        runs just before the parameters change (a checkpoint's copy finishing);
        `combine` sums the loss and gradients with other replicas' (replica mode)."""
        self.loss_scale = self.layout.batch_ranks / batch.target_count
        if self.dpo:
            if batch.reference is None:  # with LoRA: the base, now; else stored beforehand
                batch = self.with_reference(batch)
            self.loss_scale = self.layout.batch_ranks / (self.config.train.global_batch // 2)
            self.pair_sums.zero_()
        batch = self.local(batch)
        if self.schedule is None:
            loss = self.accumulate(batch)
        else:
            loss = self.pipeline_accumulate(batch)
            self.sum_tied_gradients()
        if combine is not None:
            loss = self.combined(loss, combine)
        grad_norm = self.clip_gradients(self.config.train.grad_clip)
        if before_update is not None:
            before_update()
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.start_at(self.step + 1)
        return self.sum_over_replicas(loss), grad_norm

    def combined(self, loss: torch.Tensor, combine: Combine) -> torch.Tensor:
        """`combine`'s loss; when it raises, none of this step's gradients are kept."""
        try:
            return combine(loss, [p for p in self.parameters() if p.requires_grad])
        except BaseException:
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            raise

    def local(self, batch: Sequences) -> Sequences:
        """This rank's share of a replica's sequences: all of them, or its context shard."""
        if self.layout.cp == 1:
            return batch
        return batch.context_shard(self.layout.cp, self.coordinates["cp"])

    def scaled_loss(self, row_losses: torch.Tensor, target: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The summed loss of some rows (the model's output given labels) times
        `loss_scale` (the gradients of the replicas' and context shards' ranks are
        averaged, hence the factor dp x cp): the gradients of all micro-batches of all
        ranks then add up to the gradient of the global batch's mean loss. `target`: what
        a pipeline schedule passes beside: the labels, already in the model's loss, or
        under DPO the rows' `reference`, which makes it the loss of their pairs."""
        if self.dpo:
            losses, sums = self.pair_terms(row_losses, target)
            self.pair_sums += sums
            return losses.sum() * self.loss_scale
        return row_losses.sum() * self.loss_scale

    def pair_terms(self, row_losses: torch.Tensor, reference: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """DPO's loss of each pair of these rows and the sums of its `STATISTICS`."""
        logps = -self.context_total(whole_value(row_losses))
        return pair_losses(logps, reference[:, 0], reference[:, 1], self.dpo.beta,
                           self.dpo.loss)

    def context_total(self, partial: torch.Tensor) -> torch.Tensor:
        """Each row's sum over its context shards, of which this rank holds one: the whole
        row's value, with the gradient flowing to this rank's part."""
        if self.layout.cp == 1:
            return partial
        total = partial.detach().clone()
        dist.all_reduce(total, group=self.mesh["cp"].get_group())
        return partial + (total - partial.detach())

    def with_reference(self, batch: Sequences) -> Sequences:
        """`batch` with each row's reference log-probability (the base model: adapters
        off; without LoRA, the model as it is, which before the first step is the
        reference) and its count of learned tokens, computed a micro-batch at a time on
        every rank that holds the head (zeros on the others, which never use them)."""
        counts = (batch.labels != IGNORE).sum(dim=1).float()
        logps = torch.zeros_like(counts)
        size = self.config.train.micro_batch
        with adapters_off(self.parts), self.evaluating():
            for index, micro in enumerate(batch.split(size)):
                with self.context():
                    losses = self.outputs(self.local(micro), losses=True)
                if losses is not None:
                    rows = logps[index * size : (index + 1) * size]
                    rows.copy_(-self.context_total(whole_value(losses))[: len(rows)])
        return dataclasses.replace(batch, reference=torch.stack([logps, counts], dim=1))

    def pair_statistics(self) -> dict[str, float]:
        """TRL's DPO metrics of the last step (`STATISTICS` means over its pairs; empty
        without DPO). Collective: every rank calls it at the same steps."""
        if not self.dpo:
            return {}
        sums = self.sum_over_replicas(self.sum_over_stages(self.pair_sums.clone()))
        return statistic_means((sums / self.loss_copies).tolist())

    def start_at(self, step: int) -> None:
        """Continue after `step` optimizer steps (after loading a checkpoint, too), with the
        config's hyperparameters and the learning rate its schedule gives there."""
        self.step = step
        for optimizer in self.optimizers:
            apply_hyperparameters(optimizer, self.config.train, step)

    def accumulate(self, batch: Sequences) -> torch.Tensor:
        """This replica's share of the loss: its summed loss over the global target count."""
        micro_batches = batch.split(self.config.train.micro_batch)
        total = torch.zeros((), device=self.device)
        for index, micro in enumerate(micro_batches):
            self.sync_gradients(index == len(micro_batches) - 1)
            with self.context():
                loss = self.scaled_loss(self.outputs(micro, losses=True), micro.reference)
                loss.backward()
            total += whole_value(loss).detach()
        return total / (self.layout.batch_ranks * self.loss_copies)

    def pipeline_accumulate(self, batch: Sequences) -> torch.Tensor:
        """Schedule calls of `call_size` sequences; only the last stage sees losses."""
        calls = self.micro_batches * self.config.train.micro_batch // self.call_size
        total = torch.zeros((), device=self.device)
        self.busy.start()
        for call in range(calls):
            self.sync_gradients(call == calls - 1)
            losses: list[torch.Tensor] = []
            rows = batch.rows(call * self.call_size, (call + 1) * self.call_size)
            with self.context():
                target = rows.reference if self.dpo else rows.labels
                self.schedule.step(*([rows.inputs] if self.first else []), losses=losses,
                                   **({"target": target} if self.last else {}),
                                   **rows.per_token(), labels=rows.labels)
            if self.last:
                total += torch.stack([whole_value(x).detach() for x in losses]).sum()
        self.busy.stop()
        return self.sum_over_stages(total / (self.layout.batch_ranks * self.loss_copies))

    def idle_shares(self) -> list[float]:
        """Share of the last step each pipeline rank spent waiting (the measured bubble),
        for this rank's pipeline; empty without a pipeline."""
        if self.schedule is None:
            return []
        shares: list[float | None] = [None] * self.layout.pp
        dist.all_gather_object(shares, self.busy.idle_share(), group=self.mesh["pp"].get_group())
        return shares

    def sync_gradients(self, now: bool) -> None:
        """FSDP reduces gradients only after the last micro-batch of a step."""
        for part in self.parts:
            if isinstance(part, FSDPModule):
                part.set_requires_gradient_sync(now)

    def evaluate(self, batch: Sequences) -> torch.Tensor:
        """Loss over the held-out sequences of every replica (this one holds `batch`)."""
        if self.dpo:
            return self.evaluate_pairs(batch)
        total = torch.zeros((), device=self.device)
        batch = self.local(batch)
        with self.evaluating():
            for micro in batch.split(self.config.train.micro_batch):
                with self.context():
                    losses = self.outputs(micro, losses=True)
                    if losses is not None:
                        total += whole_value(losses).sum() / batch.target_count
        return self.sum_over_replicas(self.sum_over_stages(total))

    def evaluate_pairs(self, batch: Sequences) -> torch.Tensor:
        """DPO's mean loss over the held-out pairs of every replica; their statistics
        (`pair_statistics`' names) are left in `eval_statistics`."""
        if batch.reference is None:
            batch = self.with_reference(batch)
        sums = torch.zeros(1 + len(STATISTICS), device=self.device)  # the loss, then those
        with self.evaluating():
            for micro in batch.split(self.config.train.micro_batch):
                with self.context():
                    losses = self.outputs(self.local(micro), losses=True)
                if losses is not None:
                    pair_loss, statistics = self.pair_terms(losses, micro.reference)
                    sums += torch.cat([pair_loss.sum()[None], statistics])
        sums = self.sum_over_replicas(self.sum_over_stages(sums)) / self.loss_copies
        self.eval_statistics = statistic_means(sums[1:].tolist())
        return sums[0] / sums[-1].clamp(min=1)

    @contextlib.contextmanager
    def evaluating(self):
        """The parts in evaluation mode, without gradients, for the block."""
        for part in self.parts:
            part.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for part in self.parts:
                part.train()

    def outputs(self, micro: Sequences, losses: bool = False) -> torch.Tensor | None:
        """A forward pass of the whole model: on the ranks holding the last stage the
        logits (a DTensor under tensor parallelism), or with `losses` each row's summed
        loss (the logits never all at once); None on the others."""
        kwargs = {**micro.per_token(), **({"labels": micro.labels} if losses else {})}
        if self.schedule is None:
            return self.parts[0](micro.inputs, **kwargs)
        return self.pipeline_forward(micro, kwargs)

    def whole_logits(self, micro: Sequences) -> torch.Tensor | None:
        """The logits of whole sequences, whole over the vocabulary too: on the ranks
        holding the last stage, gathered from the context-parallel group (collective),
        None on the others."""
        cp = self.layout.cp
        logits = self.outputs(self.local(micro))
        if logits is None:
            return None
        logits = whole_value(logits)
        if cp == 1:
            return logits
        shards = [torch.empty_like(logits) for _ in range(cp)]
        dist.all_gather(shards, logits.contiguous(), group=self.mesh["cp"].get_group())
        whole = logits.new_empty(len(micro), micro.inputs.shape[1], logits.shape[-1])
        for rank, shard in enumerate(shards):
            whole[:, shard_indices(whole.shape[1], cp, rank).to(whole.device)] = shard
        return whole

    def pipeline_forward(self, micro: Sequences, kwargs: dict) -> torch.Tensor | None:
        """Forward-only through the stages (no schedule), each given `kwargs`: the last
        stage's output on the rank holding it, None on the others."""
        p, tp = self.config.parallel, self.layout.tp
        seq = micro.inputs.shape[1] // (tp if p.sequence_parallel and tp > 1 else 1)
        return forward_only(
            dict(zip(self.stage_ids, self.parts, strict=True)), self.n_stages,
            self.layout.stage_owner, self.coordinates["pp"],
            self.mesh["pp"].get_group(), micro.inputs,
            (len(micro), seq, self.config.model.d_model), kwargs)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """The gradient norm over every parameter of every rank; clipped to `max_norm`."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        heads = {id(part.output.weight.grad) for part in self.parts if part.head_is_a_copy}
        counted = [grad for grad in grads if id(grad) not in heads]  # the tied matrix once
        squares = torch.zeros((), device=self.device)
        for group in group_by_mesh(counted):
            norm = torch.nn.utils.get_total_norm(group, foreach=True)
            squares += whole_value(norm) ** 2
        squares = self.sum_over_stages(squares)
        norm = squares.sqrt()
        if max_norm > 0:  # scaled on the device: reading the norm would wait for the GPU
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([local_part(grad) for grad in grads], scale)
        return norm

    def sum_over_stages(self, value: torch.Tensor) -> torch.Tensor:
        if self.layout.pp > 1:
            dist.all_reduce(value, group=self.mesh["pp"].get_group())
        return value

    def sum_over_replicas(self, value: torch.Tensor) -> torch.Tensor:
        """Summed over the ranks the batch is spread over (replicas, context shards)."""
        if self.layout.batch_ranks > 1:
            dist.all_reduce(value, group=self.mesh["dp_cp"].get_group())
        return value

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]


class BusyTimer:
    """Time a pipeline rank computes (forward and backward chunks of its stages) within
    a step; the rest of the step it waits on other stages. On a GPU the marks are CUDA
    events, read (one wait for the step's last event) only when the share is asked for,
    on log steps: the hot path never synchronizes. The CPU computes synchronously, so
    there the marks are the clock."""

    CHUNK_METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.chunks: list[tuple] = []  # (start, end) marks of the step's chunks
        self.began = self.ended = None

    def watch(self, stage: PipelineStage) -> None:
        for name in self.CHUNK_METHODS:
            setattr(stage, name, self.timed(getattr(stage, name)))

    def timed(self, method):
        def run(*args, **kwargs):
            started = self.mark()
            try:
                return method(*args, **kwargs)
            finally:
                self.chunks.append((started, self.mark()))
        return run

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def start(self) -> None:
        self.chunks, self.began, self.ended = [], self.mark(), None

    def stop(self) -> None:
        self.ended = self.mark()

    def idle_share(self) -> float:
        """The last step's idle share (waits for its work on a GPU)."""
        if self.ended is None:
            return 0.0
        if self.cuda:
            self.ended.synchronize()
        elapsed = self.seconds(self.began, self.ended)
        busy = sum(self.seconds(start, end) for start, end in self.chunks)
        return max(0.0, 1 - busy / elapsed) if elapsed else 0.0


def whole_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value; a tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a DTensor this rank holds (in place); a tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def group_by_mesh(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Gradients sharing a mesh (or plain ones) can be normed together."""
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    return list(groups.values())
