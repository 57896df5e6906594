"""Ray Train's replica groups for replica mode (`faults.mode=replicas`): each worker is
a replica group of its own, with a torch process group of its own, so that when one
fails Ray Train replaces only it and the others go on (the way Ray Train runs torchft,
whose quorum and healing raytron does itself: `control/quorum.py`).

Importing it mends, in the process that imports it (Ray Train's controller unpickles the
backend from here), how Ray 2.60's controller replaces two replica groups lost in the
same health check: `replace_around_lost_groups`."""

from __future__ import annotations

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


class ReplicaGroupsBackend(_TorchBackend):
    has_replica_groups = True  # Ray Train: replace a failed replica group alone

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        """One process group per replica group: all of them when the worker group
        starts, the new one alone when Ray Train replaces one."""
        from ray.train.v2._internal.execution.worker_group import ReplicaGroup

        if isinstance(worker_group, ReplicaGroup):
            super().on_start(worker_group, backend_config)
            return
        for group in worker_group.get_replica_groups():
            super().on_start(group, backend_config)


class ReplicaGroupsConfig(TorchConfig):
    @property
    def backend_cls(self):
        return ReplicaGroupsBackend


def replace_around_lost_groups() -> None:
    """Ray 2.60's controller replaces failed replica groups one at a time, and replacing
    one first asks the workers of every other active group to clear their results. A
    group whose worker died meanwhile (lost in the same health check, or while the
    replacement started) fails that call, and the controller fails with it (raytron
    then relaunches the whole worker group: `control/supervisor.py`). Here such a group
    is shut down (it keeps its workers' slots, and the next health check has it
    replaced, as Ray's own retry expects) and the replacement tried again."""
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    replace = WorkerGroup.replace_replica_group
    if getattr(replace, "around_lost_groups", False):
        return

    def replace_replica_group(worker_group, index: int) -> None:
        while True:
            try:
                return replace(worker_group, index)
            except RayActorError as error:
                lost = [group for i, group in enumerate(worker_group._replica_groups)
                        if i != index and group.is_active() and any(
                            w.actor._actor_id.hex() == error.actor_id
                            for w in group.get_workers())]
                if not lost:
                    raise
                for group in lost:
                    group.shutdown()

    replace_replica_group.around_lost_groups = True
    WorkerGroup.replace_replica_group = replace_replica_group


replace_around_lost_groups()
