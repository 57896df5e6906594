"""Ray Train's replica groups for replica mode (`faults.mode=replicas`): each worker is
a replica group of its own, with a torch process group of its own, so that when one
fails Ray Train replaces only it and the others go on (the way Ray Train runs torchft,
whose quorum and healing raytron does itself: `control/quorum.py`)."""

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
