"""Where a pipeline's stages go, without torch: the schedules raytron offers, the stages
each pipeline rank hosts under them, the layers of each stage and the idle share of a
step. The config's layout and `raytron plan` use these without loading torch; running
the schedules is `pipeline.py`'s."""

from __future__ import annotations

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
