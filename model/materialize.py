"""Giving a model that was built and parallelized on the meta device its real tensors,
each rank allocating only the shards it holds (torchtitan's order: build on meta, apply
tensor parallelism, activation checkpointing and FSDP, then materialize and initialize).

The values do not depend on the layout: each parameter's whole initial tensor is made
on the CPU (from its name, or read from a source), and every rank keeps its own slice
of it, one parameter at a time, so no rank ever holds more than its shards plus one
whole parameter in host memory (Megatron's CPU initialization works the same way).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

# What wrappers insert into parameter names; checkpoints and initial values use neither.
WRAPPER_PREFIXES = (_CHECKPOINT_PREFIX, "_orig_mod.")

InitialValue = Callable[[str, torch.Size], torch.Tensor]  # (name, whole shape) -> tensor


def plain_name(name: str) -> str:
    """A parameter's name as the unwrapped model has it."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def materialize(model: torch.nn.Module, device: torch.device, initial: InitialValue) -> None:
    """Allocate `model`'s parameters and buffers on `device` (each DTensor only its local
    shard) and fill every parameter with its slice of `initial(name, whole shape)`.
    Parameters shared by several modules (tied embeddings) stay shared."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keeps shared ones shared
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with torch.no_grad():
        for name, param in model.named_parameters():
            whole = initial(plain_name(name), param.shape)
            if isinstance(param, DTensor):
                param.to_local().copy_(local_slice(whole, param))
            else:
                param.copy_(whole)


def local_slice(whole: torch.Tensor, param: DTensor) -> torch.Tensor:
    """The block of `whole` that this rank holds of `param`, cut on the host: the whole
    tensor never reaches the device. (DCP locates the shards it saves the same way.)"""
    shape, offset = compute_local_shape_and_global_offset(whole.shape, param.device_mesh,
                                                          param.placements)
    for dim, (size, start) in enumerate(zip(shape, offset, strict=True)):
        whole = whole.narrow(dim, start, size)
    return whole
