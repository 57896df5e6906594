"""Where workers go: the Ray cluster to use, what its nodes offer, and the CPUs left for
tokenizing. What must fit a node (a tensor-parallel group) is a rule in
`config/validate.py`; for a local run it is known before Ray itself starts.
"""

from __future__ import annotations

import dataclasses
import os
import socket

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


DASHBOARD_PORT = 8265  # Ray's own default, where the README sends users
# A local Ray's raylet gives its agents 15 s to write their ports and exits when they are
# late, as on a machine busy with other work (ray-project/ray#65983): the start is tried
# again once.
LOCAL_STARTS = 2
STARTUP_TIMEOUT = "timed out during startup"


def start_ray(config: RaytronConfig) -> None:
    """Join `cluster.address` / $RAY_ADDRESS, or start a local Ray sized for the run."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(config)
    if address:
        ray.init(address=address)
        return
    port = None
    if config.cluster.dashboard:
        # Ray's processes find "the cluster" to ask for its state (Ray Train's placement
        # group cleaner does) through this variable, else by guessing among the Rays on the
        # machine: another one there made them ask it, or fail. Set before Ray starts, it
        # is in every process of this Ray.
        port = DASHBOARD_PORT if port_is_free(DASHBOARD_PORT) else free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    for attempt in range(LOCAL_STARTS):
        try:
            ray.init(address="local", num_cpus=local_cpus(config),  # never a `ray start`'s
                     include_dashboard=config.cluster.dashboard, dashboard_host="127.0.0.1",
                     **({"dashboard_port": port} if port else {}))
            return
        except Exception as error:  # noqa: BLE001 (Ray raises a plain Exception)
            if STARTUP_TIMEOUT not in str(error) or attempt == LOCAL_STARTS - 1:
                raise
            ray.shutdown()  # what the failed start left running


def dashboard_address() -> str | None:
    """The Ray dashboard of the Ray this process is connected to; None without one."""
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return f"http://{url.removeprefix('http://')}" if url else None


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Of a machine's free memory, what a Ray started on it gives tasks and actors by default
# (its object store takes the rest)
LOCAL_ACTOR_MEMORY = 0.7


def node_resources(config: RaytronConfig) -> list[dict[str, float]]:
    """Resources per node: this machine's for a local run (Ray not started yet), the
    alive nodes' of the cluster otherwise (joining takes no resources)."""
    if cluster_address(config) is None:
        import psutil
        import torch

        return [{"CPU": local_cpus(config), "GPU": torch.cuda.device_count(),
                 "memory": LOCAL_ACTOR_MEMORY * psutil.virtual_memory().available}]
    import ray

    start_ray(config)
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def worker_gpus(config: RaytronConfig, nodes: list[dict[str, float]]) -> float:
    """`cluster.gpus_per_worker`, or 1 when the cluster has GPUs and it is unset."""
    if config.cluster.gpus_per_worker is not None:
        return config.cluster.gpus_per_worker
    return 1 if any(node.get("GPU", 0) > 0 for node in nodes) else 0
