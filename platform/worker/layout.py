"""The device mesh that realizes a run's `Layout` (config/layout.py), and the check that
each tensor-parallel group shares a node."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from raytron.platform.config.layout import MESH_DIMS, Layout


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh | None:
    """The world's mesh with dims pp, dp_replicate, dp_shard, cp, tp, flattened into
    `dp` (the replicas), `dp_shard_cp` (what FSDP shards over) and `dp_cp` (what a step's
    batch is spread over); None on a single process without a process group. Each
    group's communicator is made here, by a first collective (NCCL makes them lazily,
    inside the first step, where a slow or failing one looks like a slow or hung step)."""
    if not dist.is_initialized():
        return None
    if dist.get_world_size() != layout.world:
        raise ValueError(f"the layout pp={layout.pp} dp={layout.dp} cp={layout.cp} "
                         f"tp={layout.tp} needs "
                         f"{layout.world} ranks, the process group has {dist.get_world_size()}")
    mesh = init_device_mesh(device_type, layout.mesh_shape, mesh_dim_names=MESH_DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    for name in (*MESH_DIMS, "dp", "dp_cp"):
        if mesh[name].size() > 1:
            dist.barrier(group=mesh[name].get_group())
    return mesh


def check_tensor_parallel_on_one_node(mesh: DeviceMesh, node_id: str, layout: Layout) -> None:
    """Tensor parallelism all-reduces in every layer: its group must share a node."""
    if layout.tp == 1:
        return
    group = mesh["tp"].get_group()
    nodes: list[str | None] = [None] * layout.tp
    dist.all_gather_object(nodes, node_id, group=group)
    if len(set(nodes)) > 1:
        raise RuntimeError(
            f"{layout.describe(dist.get_rank())}: its tensor-parallel group spans nodes "
            f"{sorted(set(nodes))}. Fix: give every node a multiple of parallel.tp={layout.tp} "
            "workers (e.g. cluster.gpus_per_worker=1 on nodes with tp GPUs), or lower "
            "parallel.tp."
        )
