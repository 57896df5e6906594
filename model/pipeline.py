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
from raytron.model.stages import MULTI_STAGE_SCHEDULES, SINGLE_STAGE_SCHEDULES

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage

# torch.distributed.pipelining (~1 s to import) is imported only where a pipeline runs:
# every worker and command would pay for it otherwise.


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


