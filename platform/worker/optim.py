"""AdamW with decoupled weight decay and the warmup + cosine learning-rate schedule.

The hyperparameters are the config's at every step, never a checkpoint's: a resumed run
applies `apply_hyperparameters` after loading the optimizer's moments, so a changed
`train.lr`, schedule, betas or weight decay takes effect from the resumed step on.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from raytron.platform.config.schema import TrainConfig


def build_optimizer(model: torch.nn.Module, train: TrainConfig,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW that decays matrices (embeddings and the head included) and leaves 1-D
    parameters (norm gains) undecayed, as nanoGPT and Megatron do. Fused (one kernel per
    group) wherever torch has the kernel, CPUs included, so that tests take the path GPUs
    take; `fused=False` asks for the foreach implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    if fused is None:
        fused = all(p.device.type in _get_fused_kernels_supported_devices() for p in params)
    groups = [{"params": members, "decayed": decayed}
              for decayed in (True, False)
              for members in by_mesh([p for p in params if (p.dim() >= 2) == decayed])]
    optimizer = torch.optim.AdamW(groups, fused=fused)
    apply_hyperparameters(optimizer, train, step=0)
    return optimizer


def by_mesh(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """`params` split by the device mesh they are DTensors on (plain tensors apart): one
    fused call cannot take both kinds (`_fused_adamw_ got mixed torch.Tensor and
    DTensor`), which tensor parallelism without sequence parallelism or FSDP makes, its
    norm gains staying plain tensors beside sharded matrices."""
    groups: dict[DeviceMesh | None, list[torch.nn.Parameter]] = {}
    for param in params:
        mesh = param.device_mesh if isinstance(param, DTensor) else None
        groups.setdefault(mesh, []).append(param)
    return list(groups.values())


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
