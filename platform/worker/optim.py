"""AdamW with decoupled weight decay and the warmup + cosine learning-rate schedule.

The hyperparameters are the config's at every step, never a checkpoint's: a resumed run
applies `apply_hyperparameters` after loading the optimizer's moments, so a changed
`train.lr`, schedule, betas or weight decay takes effect from the resumed step on.
"""

from __future__ import annotations

import math

import torch

from raytron.platform.config.schema import TrainConfig


def build_optimizer(model: torch.nn.Module, train: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW that decays matrices (embeddings and the head included) and leaves 1-D
    parameters (norm gains) undecayed, as nanoGPT and Megatron do."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "decayed": True},
        {"params": [p for p in params if p.dim() < 2], "decayed": False},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], fused=fused)
    apply_hyperparameters(optimizer, train, step=0)
    return optimizer


def apply_hyperparameters(optimizer: torch.optim.Optimizer, train: TrainConfig,
                          step: int) -> None:
    """The config's betas and weight decay, and the learning rate of `step` (0-based: the
    rate the step after `step` completed steps uses)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, train)
        group["betas"] = (train.beta1, train.beta2)
        group["weight_decay"] = train.weight_decay if group["decayed"] else 0.0


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))
