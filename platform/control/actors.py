"""The actors a run keeps across its worker groups, beside the controller: the Tracker
(metrics into MLflow, records for the console), the Coordinator (requests to stop at a
step boundary) and the DataFeeder (the global batches). They live on the controller's
node, which outlives any worker node."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from raytron.pipelines.stream import StreamSpec
from raytron.platform.config.schema import RaytronConfig
from raytron.platform.control.console import Console
from raytron.platform.control.placement import dashboard_address, start_ray
from raytron.platform.control.run_log import RunLog

POLL_S = 0.5  # how often the console shows what the tracker received
JUDGE_WAIT_S = 120.0  # the longest the end of a run waits for the last task scores


@contextlib.contextmanager
def run_actors(config: RaytronConfig, spec: StreamSpec, tokenizer_json: str,
               tracking_uri: str, run_id: str, console: Console, log: RunLog
               ) -> Iterator[dict]:
    """Start (or join) Ray and the run's actors, show the tracker's records on `console`
    (and what the actors print in `log`) while the block runs, and stop them all after."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytron.pipelines.feeder import DataFeeder
    from raytron.platform.control.coordination import Coordinator
    from raytron.platform.storage.tracking import Tracker

    start_ray(config)
    log.capture_workers()
    if dashboard := dashboard_address():  # Ray's own line saying so is in the log
        console.write(f"Ray dashboard: {dashboard}")
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tracker = ray.remote(Tracker).options(num_cpus=0, scheduling_strategy=here).remote(
        tracking_uri, run_id)
    coordinator = ray.remote(Coordinator).options(num_cpus=0, scheduling_strategy=here).remote()
    feeder = ray.remote(DataFeeder).options(
        num_cpus=0, max_concurrency=64, scheduling_strategy=here).remote(
        spec, config.data.seq_len, config.train.global_batch, config.data.prefetch_steps,
        config.data.val_sequences,
    )
    actors = {"feeder": feeder, "tracker": tracker, "coordinator": coordinator}
    if config.train.eval_tasks:
        actors["judge"] = task_judge(config, tokenizer_json, here)
    stop = threading.Event()
    poller = threading.Thread(target=show_records, args=(tracker, console, stop), daemon=True)
    poller.start()
    try:
        yield actors
    finally:
        if "judge" in actors:  # its last judgement in the tracker before the drain
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(actors["judge"].ready.remote(), timeout=JUDGE_WAIT_S)
        stop.set()
        poller.join()
        console.show(ray.get(tracker.drain.remote()))
        for actor in actors.values():
            ray.kill(actor)


def task_judge(config: RaytronConfig, tokenizer_json: str, here):
    """The run's TaskJudge actor (lm_eval builds its requests while the workers start)."""
    import ray

    from raytron.platform.models.task_judge import TaskJudge

    return ray.remote(TaskJudge).options(num_cpus=0, scheduling_strategy=here).remote(
        config, tokenizer_json)


def show_records(tracker, console: Console, stop: threading.Event) -> None:
    import ray

    while not stop.wait(POLL_S):
        console.show(ray.get(tracker.drain.remote()))
