"""How many data-parallel replicas the cluster can host now, for an elastic run.

With `parallel.dp=auto` the run's size follows the cluster: pp and tp stay fixed and dp
is the largest value that (a) the free resources can place, (b) is at least
`faults.min_dp` and at most what cluster.workers allow, and (c) divides the global batch
into whole micro-batches per replica (in replica mode, leaves each replica one at least:
they split a step unevenly where they must), so that the global batch, the data order
and the LR schedule never change; only the gradient-accumulation steps per replica do.

Capacity is asked of Ray itself: a placement group with one bundle per tensor-parallel
group (a bundle sits on one node, as a tp group must). Waiting for it is also how an
autoscaler learns what to add; the group is removed again before the workers start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raytron.platform.config.layout import Layout
from raytron.platform.config.schema import REPLICAS, RaytronConfig
from raytron.platform.config.validate import worker_request

QUICK_PROBE_S = 1.0  # capacity that is there now places within this


@dataclass(frozen=True)
class Sizing:
    layout: Layout  # at its largest dp: as many replicas as cluster.workers allow
    min_dp: int
    global_batch: int
    micro_batch: int
    group: dict[str, float]  # the resources of one tensor-parallel group
    uneven: bool = False  # replica mode: replicas may take unequal numbers of micro-batches

    @classmethod
    def of(cls, config: RaytronConfig, gpus: float) -> Sizing:
        tp = config.parallel.tp
        return cls(Layout.of(config), config.faults.min_dp, config.train.global_batch,
                   config.train.micro_batch,
                   {name: amount * tp for name, amount in worker_request(config, gpus).items()},
                   config.faults.mode == REPLICAS)

    @property
    def max_dp(self) -> int:
        return self.layout.dp

    def candidates(self, above: int = 0) -> list[int]:
        """The dp values the run may take, largest first."""
        lowest = max(self.min_dp, above + 1)
        if self.uneven:
            return list(range(min(self.max_dp, self.global_batch // self.micro_batch),
                              lowest - 1, -1))
        return [dp for dp in range(self.max_dp, lowest - 1, -1)
                if self.global_batch % (self.micro_batch * dp) == 0]

    def placeable(self, dp: int, wait_s: float) -> list[str]:
        """The nodes (ids) on which `dp` replicas' worth of tensor-parallel groups can be
        placed within `wait_s` seconds, beside whatever runs now; [] if they cannot."""
        import ray
        from ray.util.placement_group import (
            placement_group,
            placement_group_table,
            remove_placement_group,
        )

        bundles = dataclasses.replace(self.layout, dp=dp).tp_groups
        group = placement_group([dict(self.group)] * bundles, strategy="PACK")
        try:
            ready, _ = ray.wait([group.ready()], timeout=wait_s)
            if not ready:
                return []
            nodes = sorted(set(placement_group_table(group)["bundles_to_node_id"].values()))
            return [] if set(nodes) & set(draining_nodes()) else nodes  # going away: no room
        finally:
            remove_placement_group(group)

    def largest_placeable(self, wait_s: float) -> int | None:
        """The largest dp that fits; the largest of all gets `wait_s` to appear (for an
        autoscaler to add nodes), the smaller ones only a moment. None: not even min_dp."""
        for index, dp in enumerate(self.candidates()):
            if self.placeable(dp, wait_s if index == 0 else QUICK_PROBE_S):
                return dp
        return None

    def room_to_grow(self, current_dp: int) -> str | None:
        """What the largest dp above `current_dp` whose extra replicas fit beside the
        running ones now is, and where; None when there is no room."""
        for dp in self.candidates(above=current_dp):
            nodes = self.placeable(dp - current_dp, QUICK_PROBE_S)
            if nodes:
                return f"dp={dp}, with room on node(s) {', '.join(n[:8] for n in nodes)}"
        return None


def draining_nodes() -> dict[str, int]:
    """Nodes Ray is draining (node id -> deadline in ms, 0 if none): their preemption
    notice. Read as Ray Data and Ray Train read it, from Ray's private state API."""
    from ray._private.state import state

    return state.get_draining_nodes()
