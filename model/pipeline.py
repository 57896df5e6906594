"""Pipeline parallelism: cutting the GPT into stages and scheduling micro-batches over them.

A stage is the GPT with only its share of the layers (the first stage also keeps the
embedding, the last the final norm and the head); it keeps the original parameter
names. Which stages a pipeline rank hosts depends on the schedule: one for GPipe and
1F1B, `virtual_stages` in a loop for interleaved 1F1B, two in a V for zero-bubble.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from raytron.model.gpt import GPT

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

# torch.distributed.pipelining (~1 s to import) is imported only where a pipeline runs:
# every worker and command would pay for it otherwise.
SINGLE_STAGE_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B"}
MULTI_STAGE_SCHEDULES = {"interleaved-1f1b": "ScheduleInterleaved1F1B",
                         "zero-bubble": "ScheduleZBVZeroBubble"}
SCHEDULES = (*SINGLE_STAGE_SCHEDULES, *MULTI_STAGE_SCHEDULES)


def stages_per_rank(schedule: str, virtual_stages: int) -> int:
    if schedule == "zero-bubble":
        return 2
    return virtual_stages if schedule == "interleaved-1f1b" else 1


def rank_stages(schedule: str, pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """The stage indices a pipeline rank hosts, in execution order."""
    if schedule == "zero-bubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]  # V shape: the first rank has first and last
    count = stages_per_rank(schedule, virtual_stages)
    return [pp_rank + i * pp for i in range(count)]


def stage_owner(schedule: str, stage: int, pp: int) -> int:
    """The pipeline rank hosting `stage` (the inverse of `rank_stages`)."""
    if schedule == "zero-bubble" and stage >= pp:
        return 2 * pp - 1 - stage
    return stage % pp


def stage_layers(n_layers: int, n_stages: int, layers_per_stage: list[int] | None = None
                 ) -> list[range]:
    """Consecutive layer ranges per stage: as given (one count per stage, summing to
    `n_layers`: the config's validation checks it), or as even as possible, the earlier
    stages taking the remainder (the last stage also carries the output head)."""
    if layers_per_stage is None:
        base, extra = divmod(n_layers, n_stages)
        layers_per_stage = [base + (1 if i < extra else 0) for i in range(n_stages)]
    starts = [sum(layers_per_stage[:i]) for i in range(n_stages)]
    return [range(start, start + count) for start, count in zip(starts, layers_per_stage,
                                                                strict=True)]


def cut_stage(model: GPT, stage: int, n_stages: int, layers: range) -> GPT:
    """A copy of `model` (best on the meta device) holding only stage `stage`; only the
    stage's own layers are copied."""
    all_layers, model.layers = model.layers, torch.nn.ModuleDict()
    try:
        part = copy.deepcopy(model)
    finally:
        model.layers = all_layers
    part.layers = torch.nn.ModuleDict(
        {name: copy.deepcopy(layer) for name, layer in all_layers.items() if int(name) in layers}
    )
    if stage != 0:
        part.tok_embeddings = None
    if stage != n_stages - 1:
        part.norm = None
        part.output = None
    return part


def tied_copies(parts: list[GPT]) -> list[torch.nn.Parameter]:
    """This rank's copies of a tied embedding matrix that the pipeline split: the first
    stage's embedding, the last stage's head (both, on a rank hosting both stages)."""
    copies = [part.output.weight for part in parts if part.head_is_a_copy]
    copies += [part.tok_embeddings.weight for part in parts if part.shape.tie_embeddings
               and part.tok_embeddings is not None and part.output is None]
    return copies


def build_schedule(stages: list[PipelineStage], schedule: str, n_microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """A schedule that leaves gradient scaling to `loss_fn`: the schedules' own scaling
    divides all accumulated gradients at every call, which breaks accumulation over
    several calls per optimizer step."""
    import torch.distributed.pipelining as pipelining

    if schedule in SINGLE_STAGE_SCHEDULES:
        kind = getattr(pipelining, SINGLE_STAGE_SCHEDULES[schedule])
        return kind(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                    scale_grads=False)
    kind = getattr(pipelining, MULTI_STAGE_SCHEDULES[schedule])
    return kind(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


@torch.no_grad()
def forward_only(parts: dict[int, torch.nn.Module], n_stages: int, owner: Callable[[int], int],
                 pp_rank: int, group, tokens: torch.Tensor, hidden_shape: tuple[int, ...],
                 kwargs: dict) -> torch.Tensor | None:
    """Run one batch through all stages without a schedule (evaluation): each rank runs
    the stages it hosts (each given `kwargs`) and passes hidden states on. Returns the
    last stage's output (logits, or row losses given labels) on the rank hosting it,
    None elsewhere. Works for every stage placement."""
    hidden = tokens
    for stage in range(n_stages):
        here = owner(stage)
        if here != pp_rank:
            continue
        if stage > 0 and owner(stage - 1) != pp_rank:
            hidden = torch.empty(hidden_shape, device=tokens.device)
            torch.distributed.recv(hidden, group=group, group_src=owner(stage - 1))
        hidden = parts[stage](hidden, **kwargs)
        if stage == n_stages - 1:
            return hidden
        if owner(stage + 1) != pp_rank:
            torch.distributed.send(hidden.float().contiguous(), group=group,
                                   group_dst=owner(stage + 1))
    return None


def bubble_fraction(schedule: str, pp: int, n_microbatches: int, virtual_stages: int = 1
                    ) -> float:
    """Idle share of a pipeline step with equal forward/backward times per stage.

    GPipe and 1F1B: (p-1)/(m+p-1) (Narayanan et al. 2021); interleaved with v stages per
    rank: (p-1)/(v*m+p-1); zero-bubble V (Qi et al. 2024) fills the bubble with weight
    gradients once m >= 2p, else about (p-1-m/2)/(m+p-1).
    """
    if pp == 1:
        return 0.0
    if schedule == "interleaved-1f1b":
        return (pp - 1) / (virtual_stages * n_microbatches + pp - 1)
    if schedule == "zero-bubble":
        return max(0.0, pp - 1 - n_microbatches / 2) / (n_microbatches + pp - 1)
    return (pp - 1) / (n_microbatches + pp - 1)
