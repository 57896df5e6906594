"""The engine's state where Ray's dashboard and Prometheus look (`ray.util.metrics`):
sequences running and waiting, KV-cache slots in use, tokens per second, and per
request the time to the first token and between tokens; `snapshot()` for `/stats`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ray.util import metrics

from raytron.platform.serving.completions import Finished

SAMPLE_S = 1.0
LATENCY_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class EngineStats:
    def __init__(self, state: Callable[[], dict[str, int]], model: str):
        """`state`: the engine's latest `Engine.state()`."""
        self.state, self.tags = state, {"model": model}
        keys = ("model",)
        self.running = metrics.Gauge("raytron_engine_running",
                                     "sequences in the engine's slots", tag_keys=keys)
        self.waiting = metrics.Gauge("raytron_engine_waiting",
                                     "requests waiting for a slot", tag_keys=keys)
        self.slots = metrics.Gauge("raytron_engine_kv_slots_used_ratio",
                                   "share of the KV cache's slots in use", tag_keys=keys)
        self.rate = metrics.Gauge("raytron_engine_tokens_per_s",
                                  "tokens generated per second", tag_keys=keys)
        self.first = metrics.Histogram("raytron_time_to_first_token_s",
                                       "from a request's arrival at the engine to its first "
                                       "token", boundaries=LATENCY_BOUNDS, tag_keys=keys)
        self.between = metrics.Histogram("raytron_inter_token_latency_s",
                                         "between a request's tokens",
                                         boundaries=LATENCY_BOUNDS, tag_keys=keys)
        self.tokens_per_s = 0.0
        threading.Thread(target=self.sample_forever, name="raytron-engine-stats",
                         daemon=True).start()

    def snapshot(self) -> dict:
        return {**self.state(), "tokens_per_s": self.tokens_per_s}

    def sample_forever(self) -> None:
        last, then = self.state()["generated_tokens"], time.perf_counter()
        while True:
            time.sleep(SAMPLE_S)
            now, generated = time.perf_counter(), self.state()["generated_tokens"]
            self.tokens_per_s = (generated - last) / (now - then)
            last, then = generated, now
            state = self.snapshot()
            self.running.set(state["running"], tags=self.tags)
            self.waiting.set(state["waiting"], tags=self.tags)
            self.slots.set(state["kv_slots_used"] / state["kv_slots"], tags=self.tags)
            self.rate.set(self.tokens_per_s, tags=self.tags)

    def finished(self, results: list[Finished]) -> None:
        for finished in results:
            if finished.first_token_s is not None:
                self.first.observe(finished.first_token_s, tags=self.tags)
            for gap in finished.token_gaps_s:
                self.between.observe(gap, tags=self.tags)
