"""Where workers go: the Ray cluster to use, what its nodes offer, and the CPUs left for
tokenizing. What must fit a node (a tensor-parallel group) is a rule in
`config/validate.py`; for a local run it is known before Ray itself starts.
"""

from __future__ import annotations

import dataclasses
import os

from raytron.platform.config.resolve import cluster_address
from raytron.platform.config.schema import AUTO, RaytronConfig


def local_cpus(config: RaytronConfig) -> int:
    """CPUs of a locally started Ray: the machine's, or enough for every actor of the run."""
    c = config.cluster
    tokenizers = config.data.tokenizer_workers if config.data.tokenizer_workers != AUTO else 1
    needed = c.workers * c.cpus_per_worker + tokenizers + 1
    return c.num_cpus or max(os.cpu_count() or 1, needed)


MAX_AUTO_TOKENIZERS = 8


def with_tokenizer_workers(config: RaytronConfig, nodes: list[dict[str, float]]
                           ) -> RaytronConfig:
    """`data.tokenizer_workers=auto`: the CPUs the workers leave free (at least 1, at most
    8; this machine's for a local run, the cluster's otherwise)."""
    if config.data.tokenizer_workers != AUTO:
        return config
    c = config.cluster
    total = (os.cpu_count() or 1) if cluster_address(config) is None else sum(
        node.get("CPU", 0) for node in nodes)
    free = int(total - c.workers * c.cpus_per_worker)
    workers = max(1, min(MAX_AUTO_TOKENIZERS, free))
    return dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                tokenizer_workers=workers))


def start_ray(config: RaytronConfig) -> None:
    """Join `cluster.address` / $RAY_ADDRESS, or start a local Ray sized for the run."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(config)
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=local_cpus(config),  # never a `ray start` one
                 include_dashboard=config.cluster.dashboard)


def node_resources(config: RaytronConfig) -> list[dict[str, float]]:
    """Resources per node: this machine's for a local run (Ray not started yet), the
    alive nodes' of the cluster otherwise (joining takes no resources)."""
    if cluster_address(config) is None:
        import torch

        return [{"CPU": local_cpus(config), "GPU": torch.cuda.device_count()}]
    import ray

    start_ray(config)
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def worker_gpus(config: RaytronConfig, nodes: list[dict[str, float]]) -> float:
    """`cluster.gpus_per_worker`, or 1 when the cluster has GPUs and it is unset."""
    if config.cluster.gpus_per_worker is not None:
        return config.cluster.gpus_per_worker
    return 1 if any(node.get("GPU", 0) > 0 for node in nodes) else 0
