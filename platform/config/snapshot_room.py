"""Whether the in-memory snapshots (`storage/snapshots.py`) fit in the nodes' memory:
checked before the run takes any Ray resource, and again before each worker group (an
elastic cluster changes). A keeper holds two steps of its own node's ranks' shares and
of the node before it's; where that would not fit beside what the node already runs,
snapshots would push the node out of memory, which costs far more than they save."""

from __future__ import annotations

from raytron.model.estimates import GB
from raytron.platform.config.layout import Layout
from raytron.platform.config.plan import Plan
from raytron.platform.config.validate import worker_request, workers_on


def snapshots_unfit(plan: Plan, gpus: float, nodes: list[dict[str, float]]) -> str | None:
    """Why some node's keeper could not hold its snapshots, or None when every node's can.

    Counts the worst placement: a node as full of workers as its resources allow, and the
    node before it in the ring the fullest of the others. `nodes` are Ray's resources
    per node, whose `memory` is what Ray gives tasks and actors there; workers on CPUs
    keep their own state in that memory too."""
    from raytron.platform.storage.snapshots import KEPT_PER_RANK

    world = Layout.of(plan.config).world
    hosted = [min(world, workers_on(node, worker_request(plan.config, gpus)))
              for node in nodes]
    own = 0 if gpus else plan.busiest.memory.total
    for index, node in enumerate(nodes):
        before = max((n for i, n in enumerate(hosted) if i != index), default=0)
        held = KEPT_PER_RANK * plan.snapshot_share * (hosted[index] + before)
        memory = node.get("memory", 0.0)
        room = memory - hosted[index] * own
        if held > room:
            workers = f", less {size(own * hosted[index])} for its {hosted[index]} " \
                "workers' own state" if own and hosted[index] else ""
            return (f"a node's keeper may hold {size(held)} of snapshots ({KEPT_PER_RANK} "
                    f"steps of {hosted[index]} of its own workers' shares and {before} of "
                    f"another node's, {size(plan.snapshot_share)} each), and the node has "
                    f"{size(max(room, 0))} for them ({size(memory)} of memory for Ray's tasks "
                    f"and actors{workers})")
    return None


def size(bytes_: float) -> str:
    return f"{bytes_ / GB:.1f} GB" if bytes_ >= GB else f"{bytes_ / 1e6:.0f} MB"
