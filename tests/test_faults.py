"""Fault drills, their validation, and how failures are summarized."""

import pytest

from raytron.platform.cli import EXIT_CONFIG_ERROR, main
from raytron.platform.config.drills import LAST_RANK, Injection, parse_injections
from raytron.platform.config.layout import Layout
from raytron.platform.config.load import load_config
from raytron.platform.control.capacity import Sizing
from raytron.platform.control.ray_train import failure_gist
from raytron.platform.control.supervisor import with_dp


def test_drills_parse():
    assert parse_injections(["kill rank 3 at step 7", "hang rank 1 at step 5",
                             "raise in rank 0 at step 2",
                             "raise in rank 0 during checkpoint at step 10",
                             "lose a node at step 12", "lose the node of rank 2 at step 3"]) == [
        Injection(0, "kill", 3, 7), Injection(1, "hang", 1, 5), Injection(2, "raise", 0, 2),
        Injection(3, "raise", 0, 10, during_checkpoint=True),
        Injection(4, "lose", LAST_RANK, 12), Injection(5, "lose", 2, 3)]


@pytest.mark.parametrize(("entry", "expected"), [
    ("explode rank 1 at step 2", "is not a drill"),
    ("kill rank 1 during checkpoint at step 2", "is not a drill"),
    ("kill rank 7 at step 2", "rank 7 does not exist with cluster.workers=1"),
    ("lose a node at step 2", "losing a node needs a cluster of several nodes"),
])
def test_bad_drills_are_config_errors(capsys, monkeypatch, entry, expected):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["config", "tiny", f"faults.inject=[{entry}]"]) == EXIT_CONFIG_ERROR
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "expected"), [
    (["faults.min_dp=2"], "faults.min_dp=2 applies only to elastic runs"),
    (["parallel.dp=auto", "cluster.workers=2", "faults.min_dp=3"],
     "faults.min_dp=3 exceeds the 2 replicas"),
    (["faults.schedule_timeout_s=0"], "faults.schedule_timeout_s=0.0 must be a finite number"),
])
def test_bad_elastic_settings_are_config_errors(capsys, overrides, expected):
    assert main(["config", "tiny", *overrides]) == EXIT_CONFIG_ERROR
    assert expected in capsys.readouterr().err


def test_an_elastic_run_takes_only_sizes_that_keep_the_global_batch():
    sizing = Sizing(Layout(pp=1, dp=4, tp=2), min_dp=1, global_batch=8, micro_batch=2,
                    group={"CPU": 2})
    assert sizing.candidates() == [4, 2, 1]  # 3 replicas cannot split 8 sequences evenly
    assert sizing.candidates(above=1) == [4, 2]
    assert Sizing(Layout(1, 6, 1), 2, 24, 4, {"CPU": 1}).candidates() == [6, 3, 2]
    # replicas split a step by whole micro-batches, unevenly where they must
    assert Sizing(Layout(1, 6, 1), 2, 20, 4, {"CPU": 1}, uneven=True).candidates() == [5, 4,
                                                                                      3, 2]


def test_the_coordinator_knows_where_each_rank_runs_now():
    """A replaced worker (replica mode) joins again under its rank, maybe elsewhere: a
    drain of its old node no longer concerns it, and the group's size stays its size."""
    from raytron.platform.control.coordination import Coordinator

    coordinator = Coordinator()
    for rank, node in ((0, "a"), (1, "b"), (1, "c")):
        coordinator.join(rank, node)
    assert coordinator.nodes() == {"a": [0], "c": [1]}


def test_an_elastic_run_resizes_only_dp_and_keeps_each_replica_pp_cp_tp():
    """A replica is pp x cp x tp workers: dp=auto fills the cluster with whole replicas, a
    resize changes dp alone, and each tp group (cp of them per pipeline stage) is one
    bundle that must share a node."""
    config = load_config("tiny", ["parallel.dp=auto", "parallel.cp=2", "parallel.tp=2",
                                  "cluster.workers=8"])
    sizing = Sizing.of(config, gpus=0)
    assert (sizing.max_dp, sizing.layout.world, sizing.layout.tp_groups) == (2, 8, 4)
    shrunk = with_dp(config, 1)
    assert (shrunk.parallel.cp, shrunk.parallel.tp, shrunk.cluster.workers) == (2, 2, 4)
    assert Layout.of(shrunk).tp_groups == 2


def test_failures_are_summarized_per_rank_with_coordinates():
    """From Ray Train's own error: rank -> exception, never its message's text."""
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    died = WorkerHealthCheckFailedError("A worker health check failed.\nWorker info: ...",
                                        failure=RayActorError())
    error = WorkerGroupError("ignored text", {
        3: died, 0: RuntimeError("Connection closed by peer [127.0.0.1]:1234\nmore")})
    gist = failure_gist(error, Layout(1, 2, 2))
    assert gist == ("rank 0 (pp=0, dp=0, tp=0): RuntimeError: Connection closed by peer "
                    "[127.0.0.1]:1234; rank 3 (pp=0, dp=1, tp=1): A worker health check failed.")
    assert failure_gist(ValueError("boom\nlast words"), Layout()) == "ValueError: boom"


def test_a_drill_fires_once_at_its_step_or_the_first_step_its_rank_computes_after(tmp_path):
    """A replacement replica that joins at step 9 fires the drill of step 7 it missed
    there, once; the marker keeps any later process of the rank from firing it again."""
    import fsspec

    from raytron.platform.worker.faults import FaultInjector

    entries = ["raise in rank 1 at step 7", "raise in rank 1 at step 12",
               "raise in rank 1 during checkpoint at step 8", "raise in rank 0 at step 3"]
    fs = fsspec.filesystem("file")
    joined = FaultInjector(entries, 1, 2, fs, str(tmp_path), "replica 1")
    joined.at_step(6)
    with pytest.raises(RuntimeError, match="injected raise of rank 1 at step 7"):
        joined.at_step(9)
    joined.at_step(10)  # fired: not again; the checkpoint drill waits for a checkpoint
    with pytest.raises(RuntimeError, match="during the checkpoint at step 8"):
        joined.at_step(10, during_checkpoint=True)
    again = FaultInjector(entries, 1, 2, fs, str(tmp_path), "replica 1")
    again.at_step(11)
    with pytest.raises(RuntimeError, match="at step 12"):
        again.at_step(12)


WATCHED = """
import sys, time
from raytron.platform.worker.faults import Watchdog
watchdog = Watchdog(0.5, "rank 0", "the run restarts")
watchdog.beat()
if sys.argv[1] == "busy":
    with watchdog.busy("was saving a checkpoint", 5.0, "faults.checkpoint_timeout_s"):
        time.sleep(1.5)
else:
    time.sleep(1.5)
watchdog.stop()
print("thread alive:", watchdog.thread.is_alive())
"""


@pytest.mark.parametrize("phase", ["busy", "idle"])
def test_the_watchdog_gives_saves_their_own_budget_and_stops_with_the_loop(phase):
    """1.5 s without a step kills a rank with faults.hang_timeout_s=0.5, unless it is
    saving a checkpoint with its own budget of 5 s; `stop` ends the watchdog's thread."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", WATCHED, phase], capture_output=True,
                            text=True, timeout=60)
    if phase == "busy":
        assert result.returncode == 0, result.stderr
        assert "thread alive: False" in result.stdout
    else:
        assert result.returncode == -9
        assert "rank 0 made no progress for" in result.stderr
