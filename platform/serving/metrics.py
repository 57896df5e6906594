"""What a serving replica reports about its requests: one log line per request, and,
when asked, windows of request metrics in an MLflow run of its own (latency percentiles
and throughput are what people plot for an endpoint; a metric per request would flood
the store)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica's log file
EXPERIMENT = "raytron-serve"
WINDOW_S = 10.0


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


class RequestMetrics:
    """Logs each request; with a tracking URI, every `WINDOW_S` seconds that saw requests
    logs their count, errors, latency p50/p99 and completion tokens/s to MLflow."""

    def __init__(self, name: str, tracking_uri: str | None):
        self.lock = threading.Lock()
        self.window: list[Served] = []
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
        with self.lock:
            self.window.append(served)
            self.count += 1

    def flush_every_window(self) -> None:
        while True:
            time.sleep(WINDOW_S)
            self.flush()

    def flush(self) -> None:
        with self.lock:
            window, self.window, step = self.window, [], self.count
        if not window or self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = {f"serve/{key}": value for key, value in window_metrics(window).items()}
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step)
                                                    for key, value in metrics.items()])


def window_metrics(window: list[Served]) -> dict[str, float]:
    """The metrics of one window's requests (errors: 4xx answers)."""
    latencies = np.array([s.seconds for s in window])
    tokens = sum(s.completion_tokens for s in window)
    return {
        "requests": len(window),
        "errors": sum(s.status >= 400 for s in window),
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "completion_tokens": tokens,
        "completion_tokens_per_s": tokens / WINDOW_S,
    }
