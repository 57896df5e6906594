"""Direct preference optimisation's loss (Rafailov et al. 2023) and IPO's (Azar et al.
2023) on pairs of rows, with the statistics TRL's DPOTrainer reports.

A pair is two adjacent rows, chosen then rejected. Each row comes as the model's
log-probability of its learned tokens (summed), the reference model's, and how many
tokens it learns (IPO averages over them; 0 marks a row that is padding, whose pair
counts for nothing). Everything is a sum over pairs, so that the mean over a global
batch is one division whatever the layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The statistics of `pair_losses`, summed over pairs; `rewards/margins` is the first
# less the second, `rewards/accuracies` the share of pairs whose chosen reward is higher.
STATISTICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "pairs")


def pair_losses(logps: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor,
                beta: float, loss: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's loss (pairs,) and the sums of `STATISTICS` over the pairs (detached),
    from per-row log-probabilities `logps`, `reference` and learned-token `lengths`
    (rows,): TRL's `sigmoid` and `ipo` loss types."""
    chosen, rejected = logps.float().view(-1, 2).unbind(1)
    reference_chosen, reference_rejected = reference.float().view(-1, 2).unbind(1)
    chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
    chosen_length, rejected_length = lengths.float().view(-1, 2).unbind(1)
    real = (chosen_length > 0) & (rejected_length > 0)
    if loss == "ipo":
        margin = chosen_ratio / chosen_length.clamp(min=1) \
            - rejected_ratio / rejected_length.clamp(min=1)
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    with torch.no_grad():
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        statistics = torch.stack([chosen_reward, rejected_reward,
                                  (chosen_reward > rejected_reward).float(), chosen, rejected,
                                  torch.ones_like(chosen)])
        statistics = (statistics * real).sum(dim=1)
    return losses * real, statistics


def statistic_means(sums: list[float]) -> dict[str, float]:
    """The means TRL logs, from `STATISTICS` sums (over every rank's pairs)."""
    pairs = max(sums[-1], 1.0)
    means = {name: total / pairs for name, total in zip(STATISTICS[:-1], sums[:-1], strict=True)}
    means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means
