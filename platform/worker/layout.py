"""The (pp, dp, tp) layout of a run and the device mesh that realizes it.

Ranks are laid out pp-major, tp innermost: rank = (pp_i * dp + dp_i) * tp + tp_i, so the
ranks of a tensor-parallel group are consecutive, which Ray Train places on one node
when each node hosts a multiple of tp workers. The mesh splits dp into
(dp_replicate, dp_shard) for FSDP2: all shard for FSDP/ZeRO, all replicate for DDP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp: int = 1
    tp: int = 1
    dp_shard: str = "full"  # full | grad-op | none

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def mesh_shape(self) -> tuple[int, int, int, int]:
        replicate = self.dp if self.dp_shard == "none" else 1
        return (self.pp, replicate, self.dp // replicate, self.tp)

    def coordinates(self, rank: int) -> dict[str, int]:
        """{"pp": ..., "dp": ..., "tp": ...} of a global rank."""
        return {"pp": rank // (self.dp * self.tp), "dp": rank // self.tp % self.dp,
                "tp": rank % self.tp}

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        """The global rank at these coordinates (the inverse of `coordinates`)."""
        return (pp * self.dp + dp) * self.tp + tp

    def describe(self, rank: int) -> str:
        c = self.coordinates(rank)
        return f"rank {rank} (pp={c['pp']}, dp={c['dp']}, tp={c['tp']})"


def resolve_dp(dp: int | str, workers: int, pp: int, tp: int) -> int:
    """`parallel.dp`, with `auto` meaning as many replicas as the workers allow."""
    return workers // (pp * tp) if dp == "auto" else int(dp)


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh | None:
    """The world's mesh with dims pp, dp_replicate, dp_shard, tp and a flattened `dp`;
    None on a single process without a process group."""
    if not dist.is_initialized():
        return None
    if dist.get_world_size() != layout.world:
        raise ValueError(f"the layout pp={layout.pp} dp={layout.dp} tp={layout.tp} needs "
                         f"{layout.world} ranks, the process group has {dist.get_world_size()}")
    mesh = init_device_mesh(device_type, layout.mesh_shape, mesh_dim_names=MESH_DIMS)
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
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
