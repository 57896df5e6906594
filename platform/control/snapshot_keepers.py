"""The run's snapshot keepers (`storage/snapshots.py`), seen from the controller: one
per live node, placed before each worker group starts, asked after a failure which step
every rank's share survived of, and told what the next group starts from."""

from __future__ import annotations

from typing import Any

from raytron.platform.config.plan import Plan
from raytron.platform.config.snapshot_room import snapshots_unfit

ASK_TIMEOUT_S = 30.0  # a keeper that does not answer counts as lost


class SnapshotKeepers:
    def __init__(self) -> None:
        self.by_node: dict[str, Any] = {}

    def unfit(self, plan: Plan, gpus: float) -> str | None:
        """Why the usable nodes' memory cannot hold the snapshots of a worker group in
        `plan`'s layout (`config/snapshot_room.py`), having ended the keepers (a group
        without snapshots starts from a checkpoint); None when it can."""
        why = snapshots_unfit(plan, gpus, list(usable_nodes().values()))
        if why is not None:
            self.close()
        return why

    def start(self) -> None:
        """A keeper on every usable node (those on lost nodes are gone, with what they
        held), not waited for: the first ones start beside the run's other actors."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from raytron.platform.storage.snapshots import SnapshotKeeper

        usable = set(usable_nodes())
        for node in set(self.by_node) - usable:  # lost, or going
            ray.kill(self.by_node.pop(node))
        for node in sorted(usable - set(self.by_node)):
            self.by_node[node] = ray.remote(SnapshotKeeper).options(
                num_cpus=0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()

    def place(self) -> dict[str, Any]:
        """`start`, then node id -> keeper, for the workers. A keeper that is not up within
        ASK_TIMEOUT_S is left out."""
        self.start()
        self.held()  # waits for new keepers to start; drops those that do not
        return dict(self.by_node)

    def held(self) -> list[tuple[int, int, str]]:
        """(step, rank, layout) of every share a live keeper holds."""
        return [share for shares in self.ask("held").values() for share in shares]

    def ask(self, method: str, *args: Any) -> dict[str, Any]:
        """node id -> what each keeper's `method` answered; a keeper that fails to answer
        within ASK_TIMEOUT_S is lost (with what it held), and ended."""
        import ray

        asked = {node: getattr(keeper, method).remote(*args)
                 for node, keeper in self.by_node.items()}
        answers = {}
        for node, answer in asked.items():
            try:
                answers[node] = ray.get(answer, timeout=ASK_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):
                ray.kill(self.by_node.pop(node))
        return answers

    def newest_whole(self, layout: str, world: int, after: int) -> int | None:
        """The newest step after `after` of which every one of `world` ranks' shares in
        `layout` survived somewhere; None when there is none."""
        ranks: dict[int, set[int]] = {}
        for step, rank, written_in in self.held():
            if written_in == layout and step > after:
                ranks.setdefault(step, set()).add(rank)
        whole = [step for step, held in ranks.items() if held == set(range(world))]
        return max(whole, default=None)

    def retain(self, step: int | None, layout: str) -> None:
        """Keep only `step`'s shares (the next group starts from them), or none."""
        self.ask("retain", step, layout)

    def close(self) -> None:
        import ray

        for keeper in self.by_node.values():
            ray.kill(keeper)
        self.by_node = {}


def usable_nodes() -> dict[str, dict[str, float]]:
    """Node id -> resources of every live node that Ray is not draining."""
    import ray

    from raytron.platform.control.capacity import draining_nodes

    draining = set(draining_nodes())
    return {node["NodeID"]: node["Resources"] for node in ray.nodes()
            if node["Alive"] and node["NodeID"] not in draining}
