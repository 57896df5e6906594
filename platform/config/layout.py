"""The (pp, dp, cp, tp) layout of a run: the only place that knows how ranks, pipeline
stages and FSDP shards follow from it.

Every other module asks a `Layout` for the world size, a rank's coordinates (and the rank
at given coordinates), the pipeline stages, the shard and replicate degrees and what
`parallel.dp=auto` stands for, so that a new dimension is a change to this module
alone; tests/test_parallel_layout.py fails when another module computes one of them.

Ranks are laid out pp-major, tp innermost: rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp
+ tp_i, so the ranks of a tensor-parallel group are consecutive, which Ray Train places on
one node when each node hosts a multiple of tp workers, and a context-parallel group
(the ranks that split each sequence of a replica) comes next. The mesh splits dp into
(dp_replicate, dp_shard) for FSDP2: all shard for FSDP/ZeRO, all replicate for DDP;
FSDP shards parameters over dp_shard x cp (a context-parallel rank holds the whole
model otherwise, as torchtitan does), and gradients and losses are summed over dp x cp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raytron.model import stages
from raytron.platform.config.schema import AUTO, RaytronConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost first, as ranks are


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp: int = 1
    tp: int = 1
    cp: int = 1
    dp_shard: str = "full"  # full | grad-op | none
    schedule: str = "1f1b"  # parallel.schedule: which pipeline stages a pp rank hosts
    virtual_stages: int = 2  # parallel.virtual_stages, for interleaved-1f1b

    @classmethod
    def of(cls, config: RaytronConfig, dp: int | None = None) -> Layout:
        """The config's layout with `dp` replicas (an elastic run at one size), else
        `parallel.dp`, where `auto` means as many replicas as `cluster.workers` allow
        (at least 1: validation names a config that allows none)."""
        p = config.parallel
        layout = cls(p.pp, 1, p.tp, p.cp, p.dp_shard, p.schedule, p.virtual_stages)
        if dp is None:
            dp = (config.cluster.workers or 0) // layout.replica_size if p.dp == AUTO \
                else int(p.dp)
        return dataclasses.replace(layout, dp=max(1, dp))

    @property
    def replica_size(self) -> int:
        """Workers per data-parallel replica: dp=auto fills cluster.workers with them."""
        return self.pp * self.cp * self.tp

    @property
    def world(self) -> int:
        return self.dp * self.replica_size

    @property
    def tp_groups(self) -> int:
        """Tensor-parallel groups in the world: each must share a node."""
        return self.world // self.tp

    @property
    def dp_shard_degree(self) -> int:
        """The replicas FSDP shards each parameter over: all, or one with DDP."""
        return 1 if self.dp_shard == "none" else self.dp

    @property
    def shard_degree(self) -> int:
        """The ranks FSDP shards each parameter over: those replicas' context-parallel
        ranks."""
        return self.dp_shard_degree * self.cp

    @property
    def replicate_degree(self) -> int:
        """The copies of each shard: one, or all replicas with DDP."""
        return self.dp // self.dp_shard_degree

    @property
    def batch_ranks(self) -> int:
        """The ranks a step's batch is spread over (dp x cp): their gradients and losses
        add up to the batch's."""
        return self.dp * self.cp

    @property
    def mesh_shape(self) -> tuple[int, int, int, int, int]:
        """The sizes of `MESH_DIMS`."""
        return (self.pp, self.replicate_degree, self.dp_shard_degree, self.cp, self.tp)

    def coordinates(self, rank: int) -> dict[str, int]:
        """{"pp": ..., "dp": ..., "cp": ..., "tp": ...} of a global rank."""
        return {"pp": rank // (self.dp * self.cp * self.tp),
                "dp": rank // (self.cp * self.tp) % self.dp,
                "cp": rank // self.tp % self.cp, "tp": rank % self.tp}

    def rank_of(self, pp: int, dp: int, cp: int, tp: int) -> int:
        """The global rank at these coordinates (the inverse of `coordinates`)."""
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def shard_rank(self, rank: int) -> int:
        """A global rank's index among the ranks FSDP shards its parameters over."""
        c = self.coordinates(rank)
        return c["dp"] % self.dp_shard_degree * self.cp + c["cp"]

    def ranks_at(self, pp_rank: int) -> range:
        """The global ranks of pipeline rank `pp_rank`, in the order of their other
        coordinates (the same for every pipeline rank): consecutive, pp being outermost."""
        first = self.rank_of(pp_rank, 0, 0, 0)
        return range(first, first + self.world // self.pp)

    def sizes(self) -> dict[str, int]:
        """{"pp": ..., "dp": ..., "tp": ...}, and "cp" where it is above 1: what
        checkpoints and tracking record (those of runs before cp have no "cp")."""
        cp = {"cp": self.cp} if self.cp > 1 else {}
        return {"pp": self.pp, "dp": self.dp, **cp, "tp": self.tp}

    def describe(self, rank: int) -> str:
        c = self.coordinates(rank)
        cp = f", cp={c['cp']}" if self.cp > 1 else ""
        return f"rank {rank} (pp={c['pp']}, dp={c['dp']}{cp}, tp={c['tp']})"

    @property
    def stages(self) -> int:
        """Pipeline stages the model is cut into: one without a pipeline, else as many per
        pipeline rank as the schedule runs (`virtual_stages` interleaved, two in the
        zero-bubble V)."""
        if self.pp == 1:
            return 1
        return self.pp * stages.stages_per_rank(self.schedule, self.virtual_stages)

    def rank_stages(self, pp_rank: int) -> list[int]:
        """The stage indices pipeline rank `pp_rank` hosts, in execution order."""
        if self.pp == 1:
            return [0]
        return stages.rank_stages(self.schedule, pp_rank, self.pp, self.virtual_stages)

    def stage_owner(self, stage: int) -> int:
        """The pipeline rank hosting `stage` (the inverse of `rank_stages`)."""
        return stages.stage_owner(self.schedule, stage, self.pp)
