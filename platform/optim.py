"""AdamW with decoupled weight decay and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from raytron.platform.config import TrainConfig


def build_optimizer(model: torch.nn.Module, train: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW that decays matrices only: norm gains and biases are left undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=train.lr, betas=(train.beta1, train.beta2),
        fused=fused,
    )


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train) / train.lr)
