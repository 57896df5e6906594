"""What a serving replica reports about its requests: one log line per request, and,
when asked, windows of request metrics in an MLflow run of its own (latency percentiles
and throughput are what people plot for an endpoint; a metric per request would flood
the store). A window's memory is bounded, whatever the load, and an MLflow that fails
costs a window's metrics, never the replica's reporting."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica's log file
EXPERIMENT = "raytron-serve"
WINDOW_S = 10.0
LATENCIES = 10_000  # a window's latency percentiles come from its last requests


@dataclass(frozen=True)
class Served:
    """One finished request."""

    route: str
    status: int
    seconds: float
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def line(self) -> str:
        speed = self.completion_tokens / self.seconds if self.seconds else 0.0
        return (f"{self.route} {self.status} | {self.prompt_tokens} prompt + "
                f"{self.completion_tokens} completion tokens | {self.seconds:.3f} s | "
                f"{speed:.0f} tok/s")


@dataclass
class Window:
    """One window's requests: counted, their latencies kept for the last `LATENCIES`."""

    requests: int = 0
    errors: int = 0  # 4xx and 5xx answers
    completion_tokens: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES))

    def add(self, served: Served) -> None:
        self.requests += 1
        self.errors += served.status >= 400
        self.completion_tokens += served.completion_tokens
        self.latencies.append(served.seconds)

    def metrics(self) -> dict[str, float]:
        latencies = np.array(self.latencies)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency_p50_s": float(np.percentile(latencies, 50)),
            "latency_p99_s": float(np.percentile(latencies, 99)),
            "completion_tokens": self.completion_tokens,
            "completion_tokens_per_s": self.completion_tokens / WINDOW_S,
        }


class RequestMetrics:
    """Logs each request; with a tracking URI, every `WINDOW_S` seconds that saw requests
    logs their count, errors, latency p50/p99 and completion tokens/s to MLflow."""

    def __init__(self, name: str, tracking_uri: str | None):
        self.lock = threading.Lock()
        self.window = Window()
        self.count = 0
        self.client = self.run_id = None
        if tracking_uri:
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri)
            experiment = self.client.get_experiment_by_name(EXPERIMENT)
            experiment_id = experiment.experiment_id if experiment else \
                self.client.create_experiment(EXPERIMENT)
            self.run_id = self.client.create_run(experiment_id, run_name=f"serve-{name}",
                                                 tags={"raytron.model": name}).info.run_id
            threading.Thread(target=self.flush_every_window, daemon=True).start()

    def record(self, served: Served) -> None:
        logger.info(served.line())
        if self.client is None:
            return
        with self.lock:
            self.window.add(served)
            self.count += 1

    def flush_every_window(self) -> None:
        while True:
            time.sleep(WINDOW_S)
            self.flush()

    def flush(self) -> None:
        """The window's metrics to MLflow; when MLflow fails, a warning in the log."""
        with self.lock:
            window, self.window, step = self.window, Window(), self.count
        if not window.requests:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[
                Metric(f"serve/{key}", value, now, step)
                for key, value in window.metrics().items()])
        except Exception as error:
            logger.warning(f"{window.requests} requests' metrics not logged to MLflow: "
                           f"{error}")
