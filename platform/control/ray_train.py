"""Ray Train, as the substrate of one worker group: a `TorchTrainer` with one worker per
device, each running `worker.loop.train_loop`, and what its errors say about the ranks."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from raytron.platform.config.layout import Layout
from raytron.platform.config.schema import REPLICAS, RaytronConfig
from raytron.platform.storage.run_dir import RunPaths


@dataclass
class StartFrom:
    """What a worker group may start from besides the committed checkpoints."""

    snapshot: int | None = None  # the step of a whole in-memory snapshot
    keepers: dict[str, Any] = field(default_factory=dict)  # node id -> snapshot keeper


def worker_group(config: RaytronConfig, paths: RunPaths, gpus: float, actors: dict,
                 leases: dict[str, str], committed: list[int], start: StartFrom):
    """Ray Train does not restart it (the controller does, from raytron's commit marker;
    in replica mode Ray Train replaces a failed replica, up to faults.max_restarts times);
    its collectives time out shortly after the watchdog would have fired. Every worker
    gets the run's lease tokens (checked before each commit) and the `committed` steps
    the controller listed, so that all ranks try the same checkpoints, and the snapshot
    keepers with the in-memory snapshot to start from, if there is one."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytron.platform.worker.faults import FIRST_STEP_GRACE_S
    from raytron.platform.worker.loop import train_loop

    f = config.faults
    longest_wait = max(f.hang_timeout_s, FIRST_STEP_GRACE_S, f.checkpoint_timeout_s,
                       f.eval_timeout_s, f.eval_task_timeout_s)
    torch_config, failures = TorchConfig(timeout_s=int(longest_wait) + 60), 0
    if f.mode == REPLICAS:  # Ray Train replaces a lost replica; the others go on
        from raytron.platform.control.replica_groups import ReplicaGroupsConfig

        torch_config, failures = ReplicaGroupsConfig(timeout_s=int(longest_wait) + 60), \
            f.max_restarts
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "checkpoint_dir": str(paths.checkpoints),
                           "launched_at": time.time(), "leases": leases,
                           "committed": committed, "keepers": start.keepers,
                           "snapshot": start.snapshot, **actors},
        torch_config=torch_config,
        scaling_config=ScalingConfig(
            num_workers=config.cluster.workers, use_gpu=gpus > 0,
            resources_per_worker={"CPU": config.cluster.cpus_per_worker,
                                  **({"GPU": gpus} if gpus else {}),
                                  **config.cluster.worker_resources},
        ),
        run_config=RunConfig(name=config.run.name, storage_path=str(paths.dir / "ray_train"),
                             failure_config=FailureConfig(max_failures=failures)),
    )


def fit_beside(trainer) -> None:
    """`trainer.fit()` in a thread of its own. In the main thread Ray Train takes SIGINT
    over (it aborts the group and exits with status 1, saying only "Gracefully
    aborting"); beside it, Ctrl-C stays a KeyboardInterrupt in raytron's main thread,
    which stops the run and says where (`control/run.py`)."""
    outcome: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # handed to the main thread as it is
            outcome.append(error)

    thread = threading.Thread(target=fit, name="worker-group", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # a short wait: Ctrl-C interrupts the main thread between them
    if outcome:
        raise outcome[0]


def rank_failures(error: BaseException) -> dict[int, BaseException]:
    """rank -> its exception, from Ray Train's `WorkerGroupError`; {} for other errors."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    return dict(error.worker_failures) if isinstance(error, WorkerGroupError) else {}


def controller_failed(error: BaseException) -> bool:
    """Ray Train's controller itself failed (not a worker): in replica mode, as Ray
    2.60's does when it replaces a replica while another's worker has died, unless
    `replica_groups.replace_around_lost_groups` catches that."""
    from ray.train.v2.api.exceptions import ControllerError

    return isinstance(error, ControllerError)


def failure_gist(error: BaseException, layout: Layout) -> str:
    """One line per failed rank, with its mesh coordinates."""
    failures = rank_failures(error)
    if controller_failed(error):
        return f"Ray Train's controller failed: {first_line(error.controller_failure)}"
    if not failures:
        return first_line(error)
    return "; ".join(f"{layout.describe(rank)}: {first_line(failure)}"
                     for rank, failure in sorted(failures.items()))


def first_line(error: BaseException) -> str:
    """The exception's type and the first line of its message (a dead worker's health
    check failure says it died)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    name = type(error).__name__
    return (text if name.startswith(("WorkerHealthCheck", "RayActorError"))
            else f"{name}: {text}")[:300]
