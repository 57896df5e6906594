"""Applies parallelism to a plain GPT from outside it; the model file knows nothing of it.

This version applies data parallelism (DDP) over all ranks; pipeline and tensor
parallelism join here, in the order pipeline split -> tensor/sequence parallel ->
activation checkpointing -> data parallel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def parallelize(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` replicated over the world with gradients averaged; unchanged on one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
