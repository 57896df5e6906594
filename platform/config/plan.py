"""`raytron plan`: what a layout costs, computed without Ray, devices or weights.

The model is built on the meta device (no memory), cut into the stages the layout
asks for, and counted; memory per device comes from `model.estimates`, the pipeline
bubble from the schedule's formula, FLOPs from the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from raytron.model.estimates import (
    GB,
    GRADIENT_BYTES,
    MASTER_BYTES,
    OPTIMIZER_BYTES,
    MemoryPlan,
    Shards,
    in_flight_microbatches,
    memory_plan,
    ring_exchange_bytes,
)
from raytron.model.lora import is_adapter
from raytron.model.pipeline import cut_stage
from raytron.model.stages import bubble_fraction, stage_layers
from raytron.platform.config.layout import Layout
from raytron.platform.config.resolve import (
    gpt_shape,
    recompute_every,
    resolve_model,
    selective_recompute,
    step_flops_per_token,
    trained_model,
)
from raytron.platform.config.schema import RaytronConfig


@dataclass(frozen=True)
class RankPlan:
    """A pipeline rank: its stages, and the memory of its busiest device (the first
    tensor- and data-parallel rank, whose shards are the largest when sizes divide
    unevenly)."""

    pp_rank: int
    stages: list[int]
    layers: int
    memory: MemoryPlan
    parameters: list[tuple[str, tuple[int, ...]]]  # of its stages: names, whole shapes


@dataclass(frozen=True)
class Plan:
    config: RaytronConfig
    total_params: int
    trained_params: int  # all of them, but for a LoRA run's frozen base
    ranks: list[RankPlan]
    microbatches: int  # per schedule call
    bubble: float
    flops_per_step: float
    ring_bytes: float  # what a context-parallel rank sends per step (its busiest stage)

    @property
    def busiest(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.memory.total)

    def held(self, rank: int) -> int:
        """Parameter elements global `rank` holds (as many gradients, twice as many
        AdamW moments)."""
        layout = Layout.of(self.config)
        at = layout.coordinates(rank)
        shards = Shards(layout.tp, at["tp"], layout.shard_degree, layout.shard_rank(rank))
        return held_elements(self.ranks[at["pp"]].parameters, shards)[1]

    def fits(self) -> bool:
        limit = self.config.cluster.device_memory_gb
        return limit is None or self.busiest.memory.total <= limit * GB

    @property
    def snapshot_share(self) -> int:
        """Bytes of the largest device's share of an in-memory snapshot: its trained
        parameters and their AdamW moments, in fp32 (`storage/snapshots.py`)."""
        return max(rank.memory.optimizer for rank in self.ranks) // OPTIMIZER_BYTES \
            * (MASTER_BYTES + OPTIMIZER_BYTES)


def held_elements(parameters: list[tuple[str, tuple[int, ...]]], shards: Shards
                  ) -> tuple[int, int]:
    """(after tensor parallelism, held) elements of `parameters` on a device."""
    counts = [shards.held(name, shape) for name, shape in parameters]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def tokenizer_vocab(config: RaytronConfig) -> int:
    """The vocabulary the run will have: a given tokenizer's, else data.vocab_size."""
    if config.data.tokenizer and Path(config.data.tokenizer).is_file():
        from raytron.pipelines.tokenizer import load

        return load(config.data.tokenizer).get_vocab_size()
    return config.data.vocab_size


def make_plan(config: RaytronConfig) -> Plan:
    config = dataclasses.replace(config, model=resolve_model(config.model,
                                                             tokenizer_vocab(config)))
    p, t, seq = config.parallel, config.train, config.data.seq_len
    layout = Layout.of(config)
    dp, n_stages = layout.dp, layout.stages
    shape = gpt_shape(config.model)
    whole = trained_model(config)
    ranges = stage_layers(shape.n_layers, n_stages, p.layers_per_stage if p.pp > 1 else None)
    stage_params = [[(name, tuple(x.shape)) for name, x in
                     cut_stage(whole, s, n_stages, ranges[s]).named_parameters()]
                    for s in range(n_stages)] if n_stages > 1 else \
        [[(name, tuple(x.shape)) for name, x in whole.named_parameters()]]
    microbatches = t.global_batch // (t.micro_batch * dp)
    per_call = p.microbatches or microbatches
    compute_bytes = 4 if t.precision == "fp32" else 2
    ranks = []
    for pp_rank in range(p.pp):
        stages = layout.rank_stages(pp_rank)
        layers = sum(len(ranges[s]) for s in stages)
        parameters = [param for s in stages for param in stage_params[s]]
        shards = Shards(p.tp, 0, layout.shard_degree)
        tp_local, held = held_elements(parameters, shards)
        trained = held_elements([x for x in parameters if is_adapter(x[0])], shards)[1] \
            if t.lora.rank else held
        memory = memory_plan(
            shape, sum(math.prod(size) for _, size in parameters), tp_local, held, layers,
            n_stages - 1 in stages, dp=dp,
            tp=p.tp, dp_shard=p.dp_shard, sequence_parallel=p.sequence_parallel,
            micro_batch=t.micro_batch, seq_len=seq // p.cp,
            in_flight=in_flight_microbatches(p.schedule, p.pp, pp_rank, per_call,
                                             p.virtual_stages),
            recompute_every=recompute_every(t.activation_checkpointing),
            selective=selective_recompute(t.activation_checkpointing),
            compute_bytes=compute_bytes, trained=trained,
        )
        ranks.append(RankPlan(pp_rank, stages, layers, memory, parameters))
    busiest_layers = max(rank.layers for rank in ranks)
    trained_params = sum(x.numel() for x in whole.parameters() if x.requires_grad)
    return Plan(config, whole.num_params(), trained_params, ranks, per_call,
                bubble_fraction(p.schedule, p.pp, per_call, p.virtual_stages),
                step_flops_per_token(config) * t.global_batch * seq,
                ring_exchange_bytes(shape, busiest_layers, t.global_batch // dp * seq, p.cp,
                                    p.tp, compute_bytes))


def snapshot_line(plan: Plan) -> str:
    """The host memory in-memory snapshots take: a device's share is held by two keepers
    (its node's and the next node's) for its two newest snapshots
    (`storage/snapshots.py`)."""
    from raytron.platform.config.schema import AUTO
    from raytron.platform.storage.snapshots import KEPT_PER_RANK

    interval = plan.config.checkpoint.memory_interval
    every = "every step where the nodes' memory holds them" if interval == AUTO \
        else f"every {interval} step(s)"
    share = plan.snapshot_share
    return (f"snapshots   {every} (checkpoint.memory_interval={interval}): "
            f"{share / GB:.2f} GB per device copied to host memory, "
            f"{2 * KEPT_PER_RANK * share / GB:.2f} GB of host memory per device held (two "
            f"keepers x {KEPT_PER_RANK} steps); checkpoint.memory_interval=0 turns them off")


def context_parallelism_that_fits(config: RaytronConfig, limit: int = 1024
                                  ) -> tuple[int, float] | None:
    """The smallest parallel.cp above the config's (doubling it) whose busiest device
    fits `cluster.device_memory_gb`, with that device's bytes; None when none up to
    `limit` does, or the sequence does not split so far."""
    cp = config.parallel.cp * 2
    while cp <= limit and config.data.seq_len % (2 * cp) == 0:
        plan = make_plan(dataclasses.replace(
            config, parallel=dataclasses.replace(config.parallel, cp=cp)))
        if plan.fits():
            return cp, plan.busiest.memory.total
        cp *= 2
    return None


def human(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count:.0f}"


def rank_groups(ranks: list[RankPlan]) -> list[tuple[int, int]]:
    """Runs of consecutive pipeline ranks with the same row (the middle of a long pipe)."""
    def row(r: RankPlan) -> tuple:
        m = r.memory
        return (r.layers, m.params, round(m.total / 1e6))

    groups: list[tuple[int, int]] = []
    for index, rank in enumerate(ranks):
        if groups and row(ranks[groups[-1][0]]) == row(rank):
            groups[-1] = (groups[-1][0], index)
        else:
            groups.append((index, index))
    return groups


def describe(plan: Plan) -> str:
    c = plan.config
    p, t = c.parallel, c.train
    world = Layout.of(c).world
    m = plan.busiest.memory
    recompute = t.activation_checkpointing
    lines = [
        f"layout      pp={p.pp} dp={p.dp} cp={p.cp} tp={p.tp} on {world} devices; "
        f"schedule {p.schedule}"
        + (f" (v={p.virtual_stages})" if p.schedule == "interleaved-1f1b" else "")
        + f"; data parallel {p.dp_shard}; sequence parallel "
        + ("on" if p.sequence_parallel else "off"),
        f"model       {human(plan.total_params)} parameters; {c.model.family}, "
        f"{c.model.n_layers} layers x {c.model.d_model} wide, {c.model.n_heads} heads "
        f"({c.model.n_kv_heads} KV) of {c.model.head_dim}, "
        f"vocabulary {c.model.vocab_size}, sequence {c.data.seq_len}",
        f"batch       {t.global_batch} sequences per step = {t.global_batch // int(p.dp)} per "
        f"replica in micro-batches of {t.micro_batch}"
        + (f"; {plan.microbatches} per schedule call" if p.pp > 1 else ""),
        "",
        "pipeline rank  stages     layers  parameters  weights  grads  optimizer  "
        "activations  total (GB per device)",
    ]
    for first, last in rank_groups(plan.ranks):
        rank, r = plan.ranks[first], plan.ranks[first].memory
        ranks = str(first) if first == last else f"{first}-{last}"
        stages = ",".join(map(str, rank.stages)) if first == last else "..."
        lines.append(
            f"{ranks:>13}  {stages:<9}  {rank.layers:>6}  "
            f"{human(r.params):>10}  {r.weights / GB:>7.2f}  {r.gradients / GB:>5.2f}  "
            f"{r.optimizer / GB:>9.2f}  {r.activations / GB:>11.2f}  {r.total / GB:>6.2f}"
        )
    lines += [
        "",
        f"activations of pipeline rank {plan.busiest.pp_rank} (GB): "
        f"{m.activations_no_recompute / GB:.2f} storing all, "
        f"{m.activations_full_recompute / GB:.2f} recomputing every layer, "
        f"{m.activations / GB:.2f} as configured (train.activation_checkpointing={recompute})",
        f"bubble      {100 * plan.bubble:.1f}% of a step idle in the pipeline "
        f"({plan.microbatches} micro-batches over {p.pp} stages)",
        f"compute     {plan.flops_per_step:.3g} model FLOPs per step",
    ]
    if t.lora.rank:
        saved = m.held * (GRADIENT_BYTES + OPTIMIZER_BYTES) - m.gradients - m.optimizer
        lines.append(f"lora        rank {t.lora.rank} on {','.join(t.lora.targets)}: "
                     f"{human(plan.trained_params)} trained parameters "
                     f"({100 * plan.trained_params / plan.total_params:.2f}%); the frozen base "
                     f"holds no gradients or optimizer state: {saved / GB:.2f} GB per device "
                     "less than a full fine-tune")
    if t.objective == "dpo":
        reference = "the base with the adapters off: one more forward pass per step, " \
            "counted in compute" if t.lora.rank else "the starting weights: their " \
            "log-probabilities of every row computed in one forward pass before the " \
            "first step, and stored"
        lines.append(f"dpo         {t.global_batch // 2} pairs per step (beta {t.dpo.beta:g}, "
                     f"{t.dpo.loss}); the reference is {reference}, and no second model")
    if c.checkpoint.memory_interval:
        lines.append(snapshot_line(plan))
    if p.cp > 1:
        lines.append(f"context     {c.data.seq_len // p.cp} tokens of each sequence per device "
                     f"(cp={p.cp}); ring attention sends {plan.ring_bytes / GB:.2f} GB per "
                     "device per step")
    if t.peak_flops:
        ideal = plan.flops_per_step / (world * t.peak_flops)
        lines.append(f"            {ideal:.2f} s per step at 100% of {t.peak_flops / 1e12:.0f} "
                     f"TFLOP/s per device; {ideal / (1 - plan.bubble):.2f} s with the bubble")
    limit = c.cluster.device_memory_gb
    if limit is not None:
        verdict = "fits" if plan.fits() else "DOES NOT FIT"
        lines.append(f"memory      busiest device needs {m.total / GB:.1f} GB of {limit:g} GB: "
                     f"{verdict}")
        needed = None if plan.fits() else context_parallelism_that_fits(c)
        if needed:
            lines.append(f"            parallel.cp={needed[0]} splits each sequence so that it "
                         f"fits: {needed[1] / GB:.1f} GB (cluster.workers x{needed[0] // p.cp})")
    return "\n".join(lines)
