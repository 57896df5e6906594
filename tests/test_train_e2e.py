"""`raytron train` end to end on Ray: it learns, commits checkpoints, tracks in MLflow; a
run killed after a checkpoint resumes with exactly the losses of an uninterrupted run, and
so do runs that survive failure drills, resize with their cluster and are preempted. A
resumed run applies a new schedule, refuses a new source list, never starts over when its
checkpoints cannot be read, and keeps credentials out of everything it writes. An
imported Mistral fine-tunes in its own chat template; that one epoch of it teaches the
model its task takes minutes, and is marked `learning` (`python -m pytest -m learning`);
a replica run through a dozen failures takes two, and is marked `stress`."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from process_trees import kill_tree

from raytron.platform.config.layout import Layout
from raytron.platform.config.load import load_config
from raytron.platform.storage import metric_names as names
from raytron.platform.storage.checkpoint import COMMIT_MARKER, CheckpointStore
from raytron.platform.storage.tracking import LAYOUT_TAG, NOTE_TAG
from raytron.platform.worker.system_metrics import node_name
from raytron.platform.worker.trainer import Trainer

SMALL = ["model.n_layers=2", "data.seq_len=64", "train.global_batch=8", "train.micro_batch=4",
         "train.steps=24", "train.warmup_steps=4", "train.log_interval=1",
         "train.eval_interval=12", "checkpoint.interval=6", "cluster.cpus_per_worker=1",
         "cluster.dashboard=false"]


def command(root: Path, name: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "raytron.platform.cli", "train", "tiny",
            f"run.root={root}", f"run.name={name}", *SMALL, *extra]


def completed(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`argv` run to its end in a session of its own. Past `timeout` it is killed with
    every process it started (a Ray left training would slow every test after it), and
    the test fails with what it printed."""
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(argv[3:])} did not end in {timeout} s:\n{stdout[-3000:]}\n"
                    f"{stderr[-3000:]}")
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def run_to_end(root: Path, name: str, extra: tuple[str, ...] = ()) -> str:
    result = completed(command(root, name, extra), root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def start_and_wait_for_first_checkpoint(root: Path, name: str, extra: tuple[str, ...] = ()
                                        ) -> tuple[subprocess.Popen, subprocess.Popen]:
    """A training, and a second one of the same run started once the first holds the
    run's lease; returned once the first has committed its first checkpoint."""
    lease, marker = root / name / "LEASE", root / name / "checkpoints" / "step_00000006"
    with open(root / f"{name}.log", "w") as log:  # read by `output_of`
        first = subprocess.Popen(command(root, name, extra), cwd=root, start_new_session=True,
                                 stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not lease.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.Popen(command(root, name, extra), cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    while not (marker / COMMIT_MARKER).exists() and first.poll() is None \
            and time.time() < deadline:
        time.sleep(0.2)
    assert (marker / COMMIT_MARKER).exists(), "the run never committed its first checkpoint"
    return first, second


def output_of(root: Path, name: str, process: subprocess.Popen) -> str:
    process.wait(timeout=600)
    return (root / f"{name}.log").read_text()


def assert_refused_beside(second: subprocess.Popen, name: str) -> None:
    """The second training of a run was refused at once, before anything started."""
    started = time.perf_counter()
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 2, stdout[-2000:] + stderr[-2000:]
    assert time.perf_counter() - started < 60  # it ended without waiting for the first
    assert f"is being written by run '{name}', pid " in stderr
    assert "Fix: wait for it to finish" in stderr and "Traceback" not in stderr
    assert "Resuming" not in stdout and "step " not in stdout


def run_and_kill_after_first_checkpoint(root: Path, name: str) -> None:
    first, second = start_and_wait_for_first_checkpoint(root, name)
    kill_tree(first.pid)  # the driver and the Ray it started, at once
    first.wait()
    assert_refused_beside(second, name)


RAYTRON_LINE = re.compile(
    r"(|Training a \d+-token byte-level BPE tokenizer on the corpus|Starting run '|Continuing run '"
    r"|Using the \d+-token tokenizer trained on the same corpus before \("
    r"|Preparing train\.eval_tasks: |model\.init_from has \d+ token embeddings "
    r"|  applied from the resumed step on: |MLflow run |  http://127\.0\.0\.1:\d+/#/experiments/"
    r"|Layout pp=|Ray's and the workers' own output: |Ray dashboard: http://127\.0\.0\.1:\d+$"
    r"|step +\d+/\d+ \| "
    r"|checkpoint committed at step \d+$|Resuming from step \d+|failure \d+: |restarting from "
    r"step \d+ (\(in-memory snapshot\) )?in |Finished \d+ steps\. |train\.steps=auto: "
    r"|Took over the lease of "
    r"|Stopped at step \d+; |Training stopped: |Training failed: |What Ray and the workers said: "
    r"|The last committed checkpoint is kept in |raytron: rank \d+ \(pp=\d+, dp=\d+, tp=\d+\)"
    r"[ :]|raytron: replica \d+[ :]|replicas? [\d, ]+ (lost|joined)[:, ]"
    r"|every replica had been lost: )")


def assert_only_raytron_lines(output: str) -> None:
    """The console holds raytron's own lines and nothing else: no Ray log line, no
    worker's output, no library's warning (they are in the run's raytron.log)."""
    others = [line for line in output.splitlines() if not RAYTRON_LINE.match(line)]
    assert not others, "\n".join(others[:20])


def loss_history(root: Path, name: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run_id = (root / name / "mlflow_run_id").read_text().strip()
    return client, client.get_run(run_id), client.get_metric_history(run_id, names.TRAIN_LOSS)


def events(run, kind: str) -> list[str]:
    """The texts of a run's `kind` events, oldest first."""
    keys = [key for key in run.data.tags if key.startswith(f"raytron.event.{kind}_")]
    return [run.data.tags[key] for key in sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1]))]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


TASKS = ("train.eval_tasks=[raytron_word_choice]", "train.eval_task_limit=20")


@pytest.fixture(scope="module")
def whole(root) -> str:
    """The uninterrupted one-worker run every other run is compared with; its output. It
    scores a task as it trains (at each validation: steps 12 and 24)."""
    return run_to_end(root, "whole", TASKS)


def test_the_run_learns_checkpoints_and_is_tracked(root, whole):
    output = whole
    assert "step 24/24" in output and "Finished 24 steps" in output
    assert_only_raytron_lines(output)
    log = (root / "whole" / "raytron.log").read_text()
    assert "Started a local Ray instance" in log and "(TrainController pid=" in log
    client, run, history = loss_history(root, "whole")
    losses = {m.step: m.value for m in history}
    assert sorted(losses) == list(range(1, 25))
    assert losses[24] < losses[1] - 0.7, losses
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "24" and run.data.params["model.n_layers"] == "2"
    for metric in ("lr", "grad_norm", names.TOKENS_PER_S, names.STEP_TIME_S,
                   names.INPUT_WAIT_S, names.VAL_LOSS, names.VAL_PERPLEXITY):
        assert metric in run.data.metrics, metric
    for metric in ("acc", "acc_norm"):
        scored = client.get_metric_history(run.info.run_id, f"Eval/raytron_word_choice/{metric}")
        assert sorted(m.step for m in scored) == [12, 24], scored
    assert re.search(r"step 24/24 \| raytron_word_choice acc [0-9.]+ acc_norm ", output)
    assert names.MFU not in run.data.metrics and "MFU" not in output  # no peak on a CPU
    assert not [m for m in run.data.metrics if m.startswith(("layout/", "startup/"))]
    system = [m.split("/") for m in run.data.metrics if m.startswith("system/")]
    assert ["system", node_name(), "cpu_utilization_percentage"] in system, system
    assert run.data.tags[LAYOUT_TAG] == "pp=1 dp=1 tp=1 (1 worker)"
    launch, = events(run, "launch")
    assert "launch 1: pp=1 dp=1 tp=1 (1 worker) from step 0; up in " in launch
    assert run.data.tags[NOTE_TAG].startswith("**whole**: a ")
    assert "Finished 24 steps" in output and "workflowType=machine_learning" in output
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "tokenizer.json", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/loss.png", "plots/throughput.png"}
    assert run.data.tags["mlflow.source.name"].startswith("raytron train tiny")
    checkpoints = root / "whole" / "checkpoints"
    committed = sorted(p.parent.name for p in checkpoints.glob("*/" + COMMIT_MARKER))
    assert committed == ["step_00000018", "step_00000024"]  # keep_last=2


@dataclass
class Interrupted:
    """A run SIGKILLed after its first checkpoint (a second training beside it refused),
    resumed and stopped by Ctrl-C, then run again to its end."""
    ctrl_c: int  # the exit status of the resumed run that got Ctrl-C
    ctrl_c_output: str
    status: str  # `raytron status` after the Ctrl-C
    output: str  # of the last run, to the end


def ctrl_c_delivered() -> None:
    """In the child before it runs: SIGINT raises KeyboardInterrupt there even when these
    tests run where it is ignored (a background job of a script, under nohup), as a
    terminal's foreground command has it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def resume_and_ctrl_c(root: Path, name: str) -> tuple[int, str]:
    """The run resumed, and SIGINT (Ctrl-C) sent once it has trained a step: the exit
    status and the output."""
    log_file = root / f"{name}-ctrl-c.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(command(root, name), cwd=root, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=ctrl_c_delivered)
    trained = re.compile(r"Resuming from step \d+.*\nstep +\d+/24 ", re.DOTALL)
    deadline = time.time() + 300
    while not trained.search(log_file.read_text()) and process.poll() is None \
            and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=120), log_file.read_text()


@pytest.fixture(scope="module")
def killed(root, whole) -> Interrupted:
    run_and_kill_after_first_checkpoint(root, "killed")
    code, output = resume_and_ctrl_c(root, "killed")
    status = cli(root, "status", str(root / "killed")).stdout
    return Interrupted(code, output, status, run_to_end(root, "killed"))


def test_a_killed_run_resumes_with_the_uninterrupted_losses(root, killed):
    """... after a second training beside it was refused; its lease, left by the killed
    process, is taken over by the resume. Every loss logged, before the kill, between the
    resume and Ctrl-C, and after the last resume, is the uninterrupted run's."""
    assert "Took over the lease of " in killed.ctrl_c_output
    assert "is gone" in killed.ctrl_c_output
    resumed_from = int(killed.ctrl_c_output.split("Resuming from step ")[1].split()[0])
    assert resumed_from in (6, 12, 18)
    again = int(killed.output.split("Resuming from step ")[1].split()[0])
    assert again >= resumed_from and "Took over" not in killed.output
    _, _, whole = loss_history(root, "whole")
    _, run, killed_losses = loss_history(root, "killed")
    expected = {m.step: m.value for m in whole}
    assert {m.step for m in killed_losses} == set(expected)
    for metric in killed_losses:  # whenever it was computed: always the same
        assert metric.value == pytest.approx(expected[metric.step], rel=1e-5, abs=1e-6), metric
    assert run.info.status == "FINISHED"
    assert run.data.tags["raytron.resumed_from_step"] == str(again)
    resumes = events(run, "resume")
    assert f"resume 1: from step {resumed_from}, " in resumes[0] and len(resumes) == 2
    assert len(events(run, "launch")) == 3


def test_ctrl_c_stops_the_run_says_where_and_the_same_command_resumes_it(killed):
    """SIGINT (Ctrl-C) to the resumed run: exit status 130, one line saying where the run
    stopped and how it goes on, the stop in `raytron status` (the lease given back); the
    same command then finishes (above, with the uninterrupted run's losses: the steps
    after the last checkpoint are computed again)."""
    assert killed.ctrl_c == 130, killed.ctrl_c_output[-3000:]
    stopped = re.search(r"Stopped at step (\d+); the last checkpoint is step (\d+); run the "
                        r"same command to resume\.", killed.ctrl_c_output)
    assert stopped, killed.ctrl_c_output[-3000:]
    assert int(stopped.group(2)) in (6, 12, 18, 24) and int(stopped.group(1)) >= 7
    assert_only_raytron_lines(killed.ctrl_c_output)
    assert "state        KILLED" in killed.status and "(Ctrl-C)" in killed.status
    assert "writer       none" in killed.status
    assert "Finished 24 steps" in killed.output


def test_running_a_finished_run_again_changes_nothing(root, whole):
    output = run_to_end(root, "whole")
    assert "already finished 24 steps" in output


def cli(root: Path, *argv: str) -> subprocess.CompletedProcess:
    result = completed([sys.executable, "-m", "raytron.platform.cli", *argv], root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_trained_run_generates_and_evaluates(root, whole):
    """The README's "Use the model" commands on a finished run (its export trains on in
    the Mistral fine-tuning below; tests/test_parallel.py starts every layout from a
    Hugging Face folder's weights)."""
    generated = cli(root, "generate", "whole", "--prompt", "The ", "--greedy",
                    "--max-new-tokens", "16")
    assert generated.stdout.startswith("The ") and "tokens/s" in generated.stderr
    cli(root, "eval", "whole", "--data", "embedded:python-reference", "--split", "held-out")
    result = json.loads((root / "whole" / "eval" / "python-reference_step24.json").read_text())
    client, run, history = loss_history(root, "whole")
    first_loss = min(history, key=lambda m: m.step).value
    assert result["loss"] < first_loss - 0.7
    assert run.data.metrics["eval/python-reference/loss"] == pytest.approx(result["loss"])
    cli(root, "eval", "whole", "--tasks", "raytron_word_choice", "--limit", "20")
    scored = json.loads((root / "whole" / "eval" / "tasks_step24.json").read_text())
    for metric in ("acc", "acc_norm"):  # in process as during training, to the last digit
        assert scored["results"]["raytron_word_choice"][f"{metric},none"] == \
            client.get_run(run.info.run_id).data.metrics[f"Eval/raytron_word_choice/{metric}"]


def assert_losses_match(root: Path, name: str, rel: float = 1e-4,
                        reference: str = "whole", computed_once: bool = True) -> dict:
    """Every loss `name` logged (before and after any restart) equals the one-worker run's
    (`reference`); with `computed_once`, no step was logged twice (else steps after the
    last checkpoint may have been computed again, as after Ctrl-C)."""
    _, _, whole = loss_history(root, reference)
    _, run, other = loss_history(root, name)
    expected = {m.step: m.value for m in whole}
    steps = [m.step for m in other]
    assert sorted(steps if computed_once else set(steps)) == sorted(expected), \
        "a step missing or logged twice" if computed_once else "a step missing"
    for metric in other:
        assert metric.value == pytest.approx(expected[metric.step], rel=rel), metric
    return run


def test_failures_restart_a_run_from_its_last_step_and_change_nothing(root, whole):
    """dp2 on two Ray workers, with a killed rank, a hung rank caught by the watchdog and a
    rank failing inside a checkpoint save: three restarts, each from the in-memory
    snapshot of the last finished step (none computed twice, though the checkpoints are 6
    steps apart), and the losses of the uninterrupted one-worker run. (Tensor parallelism
    restarts in the elastic run below.)"""
    drills = ("faults.inject=[kill rank 1 at step 4, hang rank 1 at step 9, "
              "raise in rank 0 during checkpoint at step 12]")
    output = run_to_end(root, "faulty", ("parallel.dp=2", drills, "faults.hang_timeout_s=10",
                                         "faults.restart_backoff_s=0.5"))
    assert output.count("restarting from step") == 3
    for finished in (3, 8, 12):  # before the kill at 4, the hang at 9, the raise at 12's save
        assert f"restarting from step {finished} (in-memory snapshot) in" in output, output
        assert f"Resuming from step {finished} (in-memory snapshot)" in output
    assert "rank 1 (pp=0, dp=1, tp=0)" in output  # failures name ranks and coordinates
    assert_only_raytron_lines(output)
    run = assert_losses_match(root, "faulty")
    assert run.data.metrics["restarts"] == 3 and run.info.status == "FINISHED"
    assert run.data.tags[LAYOUT_TAG] == "pp=1 dp=2 tp=1 (2 workers)"
    assert len(events(run, "launch")) == 4  # the first and one per restart
    assert sum(tag.startswith("raytron.event.failure_") for tag in run.data.tags) == 3
    status = subprocess.run([sys.executable, "-m", "raytron.platform.cli", "status",
                             str(root / "faulty")], capture_output=True, text=True, timeout=120)
    for text in ("FINISHED", "restarts     3", "checkpoint   step 24 of 24", "pp=1 dp=2 tp=1",
                 "failure 3:"):
        assert text in status.stdout, status.stdout


def test_lost_replicas_cost_the_others_one_step_and_are_replaced(root, whole):
    """faults.mode=replicas, dp=3 (each Ray worker a whole replica): replica 0, the
    leader, killed at the start of step 5 and replica 1 hung at step 14. The others never
    restart: they go on between them (taking the lost replica's micro-batches; replica 1
    leads) and wait faults.hang_timeout_s for the hung one before they evict it;
    meanwhile Ray Train's replacement of replica 0 is up, loads the last finished step
    from the snapshot keepers, joins at step 14 and, leading again, says who came and
    went. Every step is logged once and the losses are the uninterrupted one-worker
    run's."""
    output = run_to_end(root, "replicas", (
        "faults.mode=replicas", "parallel.dp=3", "train.micro_batch=2",
        "faults.inject=[kill rank 0 at step 5, hang rank 1 at step 14]",
        "faults.hang_timeout_s=20"))
    assert "replica 0 lost: 2 replicas from step 5 on" in output, output[-5000:]
    assert "replica 0 joined at step 14, with the state of step 13 from the snapshot " \
        "keepers" in output, output[-5000:]
    assert "replica 1 lost, replica 0 joined: 2 replicas from step 14 on" in output, output
    assert "Resuming" not in output and "restarting" not in output  # no group restart
    assert_only_raytron_lines(output)
    run = assert_losses_match(root, "replicas")
    assert run.info.status == "FINISHED"
    assert len(events(run, "launch")) == 1
    assert run.data.tags[LAYOUT_TAG] == "pp=1 dp=3 tp=1 (3 workers)"
    replicas = {m.step: m.value for m in loss_history(root, "replicas")[0].get_metric_history(
        run.info.run_id, names.REPLICAS)}
    assert [replicas[s] for s in (4, 5, 13, 14)] == [3, 2, 2, 2]


# 200 steps at a learning rate low enough that summation order stays in the 7th digit (at
# tiny's 3e-3 an uninterrupted run of three replicas drifts 2e-3 from one worker's by
# step 120)
LONGER = ("train.steps=200", "train.lr=5e-4", "train.eval_interval=0",
          "checkpoint.interval=40")
# a failure every 9 steps, three on each of four replicas: a replica's next drill fires
# in its replacement (~20 s on 2 cores), so four in a row on one could outlast the run
DOZEN_DRILLS = ("kill rank 3 at step 3", "kill rank 2 at step 12", "kill rank 1 at step 21",
                "kill rank 0 at step 30", "hang rank 3 at step 39", "raise in rank 2 at step 48",
                "hang rank 1 at step 57", "kill rank 0 at step 66", "kill rank 3 at step 75",
                "kill rank 2 at step 84", "kill rank 1 at step 93", "hang rank 0 at step 102")


@pytest.fixture(scope="module")
def calm(root) -> str:
    """The uninterrupted one-worker run of LONGER."""
    return run_to_end(root, "calm", LONGER)


@pytest.mark.stress
def test_a_dozen_failures_in_a_replica_run_change_no_loss(root, calm):
    """faults.mode=replicas, dp=4, twelve drills in 200 steps on every replica, the
    leader included: kills, hangs and a raise (a drill whose replica is still being
    replaced fires as its replacement starts; when every replica is lost at once, their
    replacements resume from the newest snapshot). All of them fire, no step is logged
    twice, the worker group is never relaunched, and the losses are the uninterrupted
    one-worker run's."""
    output = run_to_end(root, "dozen", (
        *LONGER, "faults.mode=replicas", "parallel.dp=4", "train.micro_batch=2",
        f"faults.inject=[{', '.join(DOZEN_DRILLS)}]", "faults.hang_timeout_s=5",
        "faults.max_restarts=20"))
    fired = list((root / "dozen" / "checkpoints" / "faults").iterdir())
    assert len(fired) == 12, output[-5000:]
    assert "replica 3 lost: 3 replicas from step 3 on" in output, output[-5000:]
    assert "restarting" not in output  # when every replica is lost, they resume
    assert_only_raytron_lines(output)
    run = assert_losses_match(root, "dozen", rel=1e-5, reference="calm")
    assert run.info.status == "FINISHED" and len(events(run, "launch")) == 1
    client = loss_history(root, "dozen")[0]
    replicas = client.get_metric_history(run.info.run_id, names.REPLICAS)
    assert min(m.value for m in replicas) < 4


LIMITED = ("faults.max_restarts=0", "faults.inject=[kill rank 0 at step 8]")


@pytest.fixture(scope="module")
def limited(root) -> subprocess.CompletedProcess:
    """A run that fails once with no restart allowed, its checkpoint at step 6 left."""
    return completed(command(root, "limited", LIMITED), root)


def test_too_many_failures_fail_the_run_and_keep_the_checkpoint(root, limited):
    result = limited
    assert result.returncode == 1, result.stdout[-2000:]
    assert "failed 1 times, more than faults.max_restarts=0" in result.stdout
    assert "last committed checkpoint: step 6" in result.stdout
    config = load_config(str(root / "limited" / "config.yaml"))
    trainer = Trainer(config, Layout(), torch.device("cpu"), None)
    store = CheckpointStore(config.checkpoint.dir, config.checkpoint.keep_last)
    assert store.load_latest(trainer.parts, trainer.optimizers).step == 6


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_when_no_checkpoint_loads_the_run_fails_and_changes_nothing(root, limited):
    """Every shard of the committed checkpoint damaged: exit 1 naming it and why, before
    Ray starts; no restart, no fresh start at step 0, nothing pruned or overwritten."""
    checkpoints = root / "limited" / "checkpoints"
    for shard in checkpoints.glob("step_*/*.distcp"):
        shard.write_bytes(shard.read_bytes()[:64])
    before = snapshot(checkpoints)
    rays = (root / "limited" / "raytron.log").read_text().count("Started a local Ray")
    result = completed(command(root, "limited", LIMITED), root)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Cannot resume run 'limited': none of the 1 committed checkpoint(s)" in result.stdout
    assert "step 6: " in result.stdout and "Nothing was deleted or overwritten" in result.stdout
    assert "restarting" not in result.stdout and "step  1/24" not in result.stdout
    assert (root / "limited" / "raytron.log").read_text().count("Started a local Ray") == rays
    assert snapshot(checkpoints) == before


def test_a_changed_source_list_is_refused_before_anything_starts(root, whole, tmp_path):
    """Resuming with a second source would change every batch from the checkpoint on."""
    more = tmp_path / "more.jsonl"
    more.write_text('{"text": "more text"}\n')
    before = snapshot(root / "whole" / "checkpoints")
    result = completed(command(root, "whole", (
        f"data.sources=[embedded:python-reference, {more}]", "train.steps=30")), root)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"data.sources.1.path: None -> '{more}'" in result.stderr
    assert "cannot resume from its checkpoint at step 24" in result.stderr
    assert "run.name=whole-2" in result.stderr and "Traceback" not in result.stderr
    assert "Ray" not in result.stdout + result.stderr  # refused before Ray started
    assert snapshot(root / "whole" / "checkpoints") == before


SECRET = "s3cret-pw-123"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """An MLflow tracking server with basic auth on 127.0.0.1: only the credentials in the
    tracking URI get in. Yields its URI with the credentials."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": SECRET,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{folder / 'store.db'}", "--artifacts-destination",
         str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],  # its default 4 processes would crowd 2 cores
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None, "the MLflow server did not start"
            assert time.time() < deadline, "the MLflow server did not answer in 300 s"
            time.sleep(1)
    yield f"http://admin:{SECRET}@127.0.0.1:{port}"
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def test_a_resume_applies_a_new_schedule_and_keeps_credentials_out(root, killed,
                                                                    mlflow_server):
    """The finished `killed` run goes on to step 30 with a new learning rate and schedule,
    tracked on a server that needs the password in its URI: the lr logged after the
    resume follows the new schedule, and the password is used but never written. Params,
    metrics, the config, the tokenizer and the plots reach the server over HTTP."""
    from mlflow import MlflowClient

    from raytron.platform.config.schema import TrainConfig
    from raytron.platform.worker.optim import lr_at

    output = run_to_end(root, "killed", ("train.steps=30", "train.lr=2e-3",
                                         "train.min_lr=1e-4", "train.warmup_steps=2",
                                         f"tracking.uri={mlflow_server}"))
    assert SECRET not in output
    assert "applied from the resumed step on: train.lr: 0.003 -> 0.002" in output
    assert "Resuming from step 24" in output and "admin:***@127.0.0.1" in output
    client = MlflowClient(mlflow_server)
    run_id = (root / "killed" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    resume = events(run, "resume")[-1]
    assert "from step 24, changed " in resume and "train.lr: 0.003 -> 0.002" in resume
    assert "train.lr: 0.003 -> 0.002" in run.data.tags[NOTE_TAG].splitlines()[-1]
    new = TrainConfig(lr=2e-3, min_lr=1e-4, warmup_steps=2, steps=30)
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert sorted(logged) == list(range(25, 31))
    for step, value in logged.items():  # logged after `step` steps: the next step's rate
        assert value == pytest.approx(lr_at(step, new), rel=1e-6), step
    assert run.data.params["tracking.uri"].startswith("http://admin:***@127.0.0.1")
    assert not [k for k, v in run.data.params.items() if SECRET in v]
    assert not [k for k, v in run.data.tags.items() if SECRET in v]
    assert {"config.yaml", "tokenizer.json", "plots"} <= {
        a.path for a in client.list_artifacts(run_id)}  # uploaded through the server
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {
        "plots/loss.png", "plots/throughput.png"}
    artifact = Path(client.download_artifacts(run_id, "config.yaml", str(root)))
    for saved in (artifact, root / "killed" / "config.yaml"):
        assert SECRET not in saved.read_text() and "admin:***@" in saved.read_text()


def drain(cluster, node) -> None:
    """What Ray does before a node goes (`ray start` on SIGTERM, a spot interruption)."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    accepted, why = GcsClient(address=cluster.address).drain_node(
        node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "preemption drill", int(time.time() * 1000) + 60_000)
    assert accepted, why


def test_an_elastic_run_shrinks_and_grows_with_its_nodes(root, whole):
    """dp=auto on 4 workers (1x2x2) over two 2-worker nodes, with async checkpoints: losing a
    node shrinks the run to 1x1x2, a node joining grows it back to 1x2x2, and a preemption
    notice for a node (Ray draining it) checkpoints at once and shrinks it again. The losses
    are those of the uninterrupted one-worker run."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    worker_node = {"num_cpus": 4, "resources": {"trainer": 2}}  # 2 workers per node
    nodes = [cluster.add_node(**worker_node) for _ in range(2)]
    process = subprocess.Popen(
        command(root, "elastic", (
            f"cluster.address={cluster.address}", "parallel.dp=auto", "parallel.tp=2",
            "cluster.workers=4", "cluster.worker_resources={trainer: 1}",
            "data.tokenizer_workers=1", "checkpoint.async_save=true",
            "faults.inject=[lose a node at step 8]", "faults.schedule_timeout_s=3",
            "faults.capacity_check_s=1", "faults.restart_backoff_s=0.5")),
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        added = grown = drained = False
        for line in process.stdout:
            lines.append(line)
            if "resizing: dp 2 -> 1" in line and not added:
                nodes.append(cluster.add_node(**worker_node))  # capacity returns
                added = True
            grown = grown or "resizing: dp 1 -> 2" in line
            if grown and line.startswith("step ") and not drained:
                drain(cluster, nodes[-1])  # the new node will be preempted: notice
                drained = True
        assert process.wait(timeout=60) == 0, "".join(lines)[-5000:]
    finally:
        process.kill()
        cluster.shutdown()
    output = "".join(lines)
    resizes = [line.split("resizing: ")[1].split(" at")[0] for line in lines
               if line.startswith("resizing: ")]
    assert resizes == ["dp 2 -> 1", "dp 1 -> 2", "dp 2 -> 1"], output[-5000:]
    assert "injected loss of the node of the last rank at step 8" in output
    assert "is being preempted" in output
    # a snapshot loads only in its own layout: shrunk after the node's loss, the run
    run = assert_losses_match(root, "elastic", computed_once=False)  # resumes from step 6
    assert run.data.metrics["restarts"] == 1 and run.info.status == "FINISHED"
    layouts = [launch.split(" dp=")[1].split()[0] for launch in events(run, "launch")]
    assert layouts == ["2", "1", "2", "1"], layouts
    assert sum(tag.startswith("raytron.event.resize_") for tag in run.data.tags) == 3
    status = subprocess.run([sys.executable, "-m", "raytron.platform.cli", "status",
                             str(root / "elastic")], capture_output=True, text=True, timeout=120)
    for text in ("last layout  pp=1 dp=1 tp=2", "resize", "is being preempted"):
        assert text in status.stdout, status.stdout


ONE_WORKER_NODE = {"num_cpus": 2, "resources": {"trainer": 1}}


def lose_a_node(root: Path, name: str, extra: tuple[str, ...],
                react: Callable[[str, Any, list], None]) -> list[str]:
    """A run over two single-worker nodes (and a head without workers) that loses the
    last rank's node (its raylet killed) at step 8; `react(line, cluster, nodes)` sees
    each line of its output as it comes (to add or drain nodes). Its lines, once it
    ended well."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    nodes = [cluster.add_node(**ONE_WORKER_NODE) for _ in range(2)]
    process = subprocess.Popen(
        command(root, name, (
            f"cluster.address={cluster.address}", "cluster.worker_resources={trainer: 1}",
            "data.tokenizer_workers=1", "faults.inject=[lose a node at step 8]", *extra)),
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in process.stdout:
            lines.append(line)
            react(line, cluster, nodes)
        assert process.wait(timeout=60) == 0, "".join(lines)[-5000:]
    finally:
        process.kill()
        cluster.shutdown()
    return lines


def test_a_lost_node_costs_no_step_when_the_next_node_holds_its_snapshot(root, whole):
    """dp2 over two single-worker nodes: the last rank's node is lost after step 7 (its
    raylet killed, with its worker and its snapshot keeper). The restarted group, on a
    node that joins, loads rank 1's share from the copy the next node's keeper took: it
    starts at step 7, computes no finished step again, and ends with the losses of the
    uninterrupted one-worker run."""
    def add_a_node_after_the_failure(line: str, cluster, nodes: list) -> None:
        if line.startswith("failure 1: "):
            nodes.append(cluster.add_node(**ONE_WORKER_NODE))  # capacity returns

    output = "".join(lose_a_node(root, "node-lost", (
        "parallel.dp=2", "cluster.workers=2", "faults.restart_backoff_s=0.5"),
        add_a_node_after_the_failure))
    assert "injected loss of the node of the last rank at step 8" in output
    assert "restarting from step 7 (in-memory snapshot) in" in output, output[-5000:]
    assert "Resuming from step 7 (in-memory snapshot)" in output
    run = assert_losses_match(root, "node-lost")
    assert run.data.metrics["restarts"] == 1 and run.info.status == "FINISHED"


def test_a_replica_run_loses_a_node_lives_and_resizes_with_its_nodes(root, calm):
    """faults.mode=replicas, parallel.dp=auto over two single-worker nodes, for LONGER's
    200 steps. The last replica's node is lost at the start of step 8 (its raylet killed):
    replica 0 computes step 8 alone, with both halves of the batch, and trains on; a node
    joins, Ray Train places the replacement there, and it joins replica 0 with the state
    of the step before from the snapshot keeper of replica 0's node. That node is then
    drained (its preemption notice): the quorum stops both replicas after one step, which
    is committed, and the run relaunches with the one replica that fits; a node joins and
    the run grows back to two. The losses are the one-worker run's, none logged twice."""
    shrunk: list[str] = []

    def add_and_drain_nodes(line: str, cluster, nodes: list) -> None:
        if line.startswith("replica 1 lost"):
            nodes.append(cluster.add_node(**ONE_WORKER_NODE))  # capacity returns
        if line.startswith("replica 1 joined:"):
            drain(cluster, nodes[-1])  # the replacement's node will be preempted
        if line.startswith("resizing: dp 2 -> 1"):
            shrunk.append(line)
        elif shrunk and line.startswith("step ") and len(nodes) == 3:  # one replica trains:
            nodes.append(cluster.add_node(**ONE_WORKER_NODE))  # capacity returns again

    lines = lose_a_node(root, "replica-nodes", (
        "faults.mode=replicas", "parallel.dp=auto", "cluster.workers=2",
        "faults.schedule_timeout_s=3", "faults.capacity_check_s=1", *LONGER),
        add_and_drain_nodes)
    output = "".join(lines)
    assert "injected loss of the node of the last rank at step 8" in output
    assert "replica 1 lost: 1 replica from step 8 on" in output, output[-5000:]
    joined = re.search(r"replica 1 joined at step (\d+), with the state of step (\d+) from "
                       r"the snapshot keepers", output)
    assert joined, output[-5000:]
    assert 8 < int(joined.group(1)) <= 200 and int(joined.group(2)) == int(joined.group(1)) - 1
    assert f"replica 1 joined: 2 replicas from step {joined.group(1)} on" in output
    stopped = re.search(r"stopped at step (\d+): node \w+ \(ranks 1\) is being preempted",
                        output)
    assert stopped and int(stopped.group(1)) >= int(joined.group(1)), output[-5000:]
    resizes = [line.split("resizing: ")[1].split(" (")[0] for line in lines
               if line.startswith("resizing: ")]
    assert resizes == [f"dp 2 -> 1 at step {stopped.group(1)}", resizes[1]], output[-5000:]
    assert resizes[1].startswith("dp 1 -> 2 at step ")
    assert not re.search(r"^failure \d", output, re.M) and "restarting" not in output
    run = assert_losses_match(root, "replica-nodes", rel=1e-5, reference="calm")
    assert run.info.status == "FINISHED" and "restarts" not in run.data.metrics
    layouts = [launch.split(" dp=")[1].split()[0] for launch in events(run, "launch")]
    assert layouts == ["2", "1", "2"], layouts


def reverse_words_exact_matches(run_dir: Path) -> int:
    """Greedy answers of the model to 100 reverse-words chats held out of fine-tuning
    (data.val_share=0.05 of sft-tiny) that equal the expected answer."""
    from raytron.pipelines.embedded import REVERSE_WORDS
    from raytron.platform.models.answers import exact_answers, held_out_samples

    return exact_answers(run_dir, held_out_samples(REVERSE_WORDS, 0.05, 100))


# Mistral-7B-Instruct-v0.1's chat template, as its tokenizer_config.json ships it
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
    "user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def as_mistral_instruct_folder(folder: Path) -> int:
    """An exported raytron folder turned into a Mistral-family model with Mistral
    Instruct's chat template: model_type mistral, [INST], [/INST] and </s> added to its
    tokenizer as special tokens (as Mistral's v0.3 tokenizer has them), the template in
    tokenizer_config.json, and its embeddings cut to its old vocabulary, so that the new
    tokens have no rows (fine-tuning must grow them). Returns </s>'s id."""
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rows = tokenizer.get_vocab_size()
    tokenizer.add_special_tokens([AddedToken(t, special=True)
                                  for t in ("[INST]", "[/INST]", "</s>")])
    tokenizer.save(str(folder / "tokenizer.json"))
    weights = load_file(folder / "model.safetensors")
    save_file({name: tensor[:rows] if "embed" in name or "lm_head" in name else tensor
               for name, tensor in weights.items()}, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({
        **config, "vocab_size": rows, "model_type": "mistral", "sliding_window": None,
        "architectures": ["MistralForCausalLM"]}))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **settings, "chat_template": MISTRAL_TEMPLATE, "bos_token": "<|begin_of_text|>",
        "eos_token": "</s>"}))
    return tokenizer.token_to_id("</s>")


@pytest.fixture(scope="module")
def mistral_instruct(root, whole) -> int:
    """The pre-trained run exported and turned into a Mistral Instruct folder
    (`as_mistral_instruct_folder`); its </s> id."""
    cli(root, "export", "whole", "mistral-instruct")
    return as_mistral_instruct_folder(root / "mistral-instruct")


def fine_tune_the_mistral(root: Path, name: str, end: int, *extra: str) -> None:
    """sft-tiny (configs/sft-tiny.yaml) at pre-training's learning rate from the Mistral
    folder, with no rows for its [INST] tokens: the vocabulary grows, the chats are
    rendered and masked in Mistral's template (not ChatML), the run keeps that template
    and ends answers with its </s>, and it exports as a Mistral again."""
    result = cli(root, "train", "sft-tiny", f"run.root={root}", f"run.name={name}",
                 f"model.init_from={root / 'mistral-instruct'}", "train.lr=3e-3",
                 "cluster.dashboard=false", *extra)
    output = result.stdout + result.stderr
    assert "growing the embeddings (and head)" in output
    assert re.search(r"Finished \d+ steps", output)
    assert_only_raytron_lines(output)
    saved = json.loads((root / name / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == MISTRAL_TEMPLATE
    from raytron.platform.models.sources import open_source

    assert end in open_source(root / name).end_ids
    cli(root, "export", name, f"{name}-hf")
    exported = json.loads((root / f"{name}-hf" / "config.json").read_text())
    assert exported["architectures"] == ["MistralForCausalLM"]


def test_an_imported_mistral_fine_tunes_in_its_own_template_and_exports_as_one(
        root, mistral_instruct):
    """`fine_tune_the_mistral` for 20 steps; its losses fall."""
    fine_tune_the_mistral(root, "sft-mistral-short", mistral_instruct, "train.steps=20",
                          "train.log_interval=1")
    _, _, losses = loss_history(root, "sft-mistral-short")
    by_step = {m.step: m.value for m in losses}
    assert by_step[20] < by_step[1] - 0.5, by_step


@pytest.mark.learning
def test_fine_tuning_teaches_an_imported_mistral_what_it_could_not_do_in_its_template(
        root, mistral_instruct):
    """`fine_tune_the_mistral` for one epoch (609 steps): reverse-words goes from ~0 to
    >= 90 exact answers out of 100 chats it never trained on (answered in Mistral's
    template and ended by its </s>; sft-tiny's own 500 steps at 2e-3 give 81, its epoch
    88)."""
    assert reverse_words_exact_matches(root / "whole") <= 5
    fine_tune_the_mistral(root, "sft-mistral", mistral_instruct, "train.steps=auto",
                          "train.log_interval=100")
    assert reverse_words_exact_matches(root / "sft-mistral") >= 90


def write_limited_corpus(folder: Path) -> Path:
    """A JSONL file of 300 paragraphs of the Python reference: a few dozen steps."""
    from pydoc_data.topics import topics

    paragraphs = [p for key in sorted(topics) for p in topics[key].split("\n\n") if p.strip()]
    path = folder / "paragraphs.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs[:300]))
    return path


def data_steps(path: Path, tokenizer_file: Path, seq_len: int, global_batch: int) -> int:
    """The whole global batches one epoch of `path` gives, counted here with the run's
    tokenizer: every document and its EOS, cut into sequences sharing one token."""
    from raytron.pipelines.tokenizer import eos_id, load

    tokenizer = load(tokenizer_file)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    assert eos_id(tokenizer) is not None
    return (tokens - 1) // seq_len // global_batch


@pytest.fixture(scope="module")
def limited_data(root) -> tuple[str, ...]:
    path = write_limited_corpus(root)
    return (f"data.sources=[{{path: {path}, epochs: 1}}]", "data.val_share=0",
            "train.eval_interval=0", "train.log_interval=4")


def test_steps_auto_trains_exactly_the_data_and_a_second_training_is_refused(root,
                                                                            limited_data):
    """train.steps=auto: one pass counts the steps, the run trains exactly them and ends
    with exit 0; a second training of the run started meanwhile is refused at once, and
    the first finishes with its checkpoints intact."""
    extra = (*limited_data, "train.steps=auto")
    first, second = start_and_wait_for_first_checkpoint(root, "auto", extra)
    assert_refused_beside(second, "auto")
    output = output_of(root, "auto", first)
    assert first.returncode == 0, output[-3000:]
    steps = data_steps(root / "paragraphs.jsonl", root / "auto" / "tokenizer.json", 64, 8)
    assert steps > 6
    assert f"train.steps=auto: the data gives {steps} steps of 8 sequences" in output
    assert f"Finished {steps} steps" in output
    store = CheckpointStore(root / "auto" / "checkpoints", keep_last=2)
    assert store.committed_steps()[-1] == steps
    assert all(store.intact(step) is None for step in store.committed_steps())
    assert "Took over" not in output and not (root / "auto" / "LEASE").exists()


def test_data_that_runs_out_ends_the_run_at_once_with_a_checkpoint(root, limited_data):
    """train.steps beyond what one epoch gives: no restart, one line with the fix, the last
    step checkpointed; the same command ends the same way, at once (before Ray starts)."""
    result = completed(command(root, "runs-out", (*limited_data, "train.steps=1000")), root)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    steps = data_steps(root / "paragraphs.jsonl", root / "runs-out" / "tokenizer.json", 64, 8)
    assert output.count(f"the data ran out after step {steps} of train.steps=1000") == 1
    assert "Fix: train.steps=auto" in output
    assert "restarting" not in output and "failed 1 times" not in output
    assert "Error in training function" not in output  # no worker's traceback
    assert "pipelines.mixture.DataExhausted" not in output
    store = CheckpointStore(root / "runs-out" / "checkpoints", keep_last=2)
    assert store.committed_steps()[-1] == steps
    _, run, _ = loss_history(root, "runs-out")
    assert run.info.status == "FAILED"
    assert f"training stopped: the data ran out after step {steps}" in events(run, "stop")[0]
    again = completed(command(root, "runs-out", (*limited_data, "train.steps=1000")), root)
    assert again.returncode == 1
    assert f"the data ran out after step {steps} of train.steps=1000" in again.stdout
    assert "Starting run" not in again.stdout, again.stdout
    assert store.committed_steps()[-1] == steps
