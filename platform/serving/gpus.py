"""The GPUs a serving replica asks Ray for, and the device it then loads the model onto.

Ray no longer empties CUDA_VISIBLE_DEVICES for an actor that asks for no GPU, so a
replica that asked for none would still see every GPU of its node and load onto the
first, beside the training workers Ray gave it to. A replica therefore asks for what it
uses: given GPUs, Ray makes them the only visible ones (`cuda` is the first of them);
given none, it keeps to the CPU."""

from __future__ import annotations


def gpus_problem(value: float) -> str | None:
    """Why Ray would refuse `value` GPUs per replica, or None."""
    if not value >= 0:
        return f"{value:g} GPUs per replica is not 0 or more: give 0 to serve on CPUs"
    if value > 1 and not value.is_integer():
        return (f"{value:g} GPUs per replica: Ray gives a replica a fraction of one GPU or "
                "whole GPUs. Give e.g. 0.5 (two replicas per GPU), 1 or 2")
    return None


def default_gpus(cluster_gpus: float) -> float:
    """GPUs per replica when none are asked for: one where the cluster has GPUs."""
    return 1 if cluster_gpus > 0 else 0


def cluster_gpus() -> float:
    """The GPUs of the Ray this process is connected to; before it connects (`serve run`
    builds the application first), this machine's, which the Ray it starts will have."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0)
    import torch

    return torch.cuda.device_count()


def replica_device() -> str:
    """`cuda` (the first GPU Ray assigned this actor) when it was assigned GPUs that torch
    can use, else `cpu`: a GPU id alone, on a machine without CUDA, is no device."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
