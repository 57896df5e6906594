"""MLflow system metrics of each worker node: one worker per node (its local rank 0)
samples CPU, memory, disk and network use, and GPU use when `pynvml` imports, in a
background thread, and sends them to the run's Tracker actor.

They are collected by MLflow's own monitor classes and named as its
`SystemMetricsMonitor(node_id=...)` names them (`system/<node>/cpu_utilization_percentage`,
shown in the run page's System metrics tab), but not logged by that monitor: it writes
to the tracking store from the node it runs on and reads the run back at every sample,
while the default store is a SQLite file only the head node sees (a worker node would
write to an empty store of its own). Through the Tracker they land where every other
metric of the run does.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable

SYSTEM_PREFIX = "system/"
logger = logging.getLogger(__name__)


def node_name() -> str:
    """The machine's host name, as a metric name allows it: psutil measures the machine."""
    return re.sub(r"[^\w.\-]", "_", socket.gethostname()) or "node"


def monitors() -> list:
    """MLflow's monitors for this machine: CPU and memory, disk, network, and a GPU
    monitor when one starts (NVIDIA through pynvml, else AMD through pyrsmi)."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
    from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

    found = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    for gpu in (GPUMonitor, ROCMMonitor):
        try:
            return [*found, gpu()]
        except Exception:  # no library, or no such GPU: none of its metrics
            continue
    return found


class SystemSampler:
    """Samples this node every `interval_s` seconds until stopped, then once more (so a
    short run has a sample too), and hands each sample to `send`."""

    def __init__(self, send: Callable[[dict[str, float]], None], interval_s: float,
                 node: str | None = None):
        self.send = send
        self.interval_s = interval_s
        self.prefix = f"{SYSTEM_PREFIX}{node or node_name()}/"
        self.monitors: list = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="raytron-system-metrics",
                                       daemon=True)
        self.thread.start()

    def sample(self) -> dict[str, float]:
        """One sample of every monitor, named as MLflow names them."""
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return {self.prefix + name: value for name, value in metrics.items()}

    def loop(self) -> None:
        """Finds the monitors first (importing MLflow's takes a second or more), here
        rather than on the way to the first training step."""
        self.monitors = monitors()
        self.sample()  # CPU use is measured between two samples: this one starts the first
        while not self.stopped.wait(self.interval_s):
            self.send_sample()

    def send_sample(self) -> None:
        try:
            self.send(self.sample())
        except Exception as error:  # monitoring never stops training: the run goes on
            logger.warning("raytron: a sample of system metrics was not logged: %s", error)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self.send_sample()
