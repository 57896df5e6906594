"""MLflow tracking, read back through MLflow's API: a fallback to an older checkpoint is
shown and tagged; a reopened run takes its new name and records each resume where the
run page shows it; the loss comes first on the run page, each launch is an event, not a
chart; links open MLflow's training view; nothing sent to MLflow carries a credential."""

import time
from types import SimpleNamespace

from mlflow import MlflowClient

from raytron.platform.config.resume import changes
from raytron.platform.storage import metric_names as names
from raytron.platform.storage.tracking import (
    EXPERIMENT_KIND_TAG,
    LAYOUT_TAG,
    NOTE_TAG,
    RunTracking,
    Tracker,
    run_url,
)
from raytron.platform.worker.loop import WorkerLoop
from raytron.platform.worker.system_metrics import SystemSampler, node_name

ABOUT = "**first**: a 1.00M-parameter GPT"


def test_a_resume_names_the_step_it_loaded_and_tags_each_fallback(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = RunTracking(uri, "tests", str(tmp_path / "artifacts"))
    run_id, reopened = tracking.open(tmp_path, "first", {"train.lr": 0.003}, ABOUT)
    assert not reopened
    tracker = Tracker(uri, run_id)
    tracker.resumed(6, [(12, "CheckpointException: truncated shard at https://u:pw@host/x")])
    (step, record), = tracker.drain()
    assert step == 6 and record["event"].startswith("Resuming from step 6\n")
    assert "checkpoint step 12 cannot be loaded (CheckpointException" in record["event"]
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags["raytron.resumed_from_step"] == "6"
    assert "checkpoint step 12 cannot be loaded" in tags["raytron.event.fallback_1"]
    assert "u:***@host" in tags["raytron.event.fallback_1"] and "pw" not in str(tags)

    again, reopened = tracking.open(tmp_path, "renamed", {"train.lr": 0.001}, ABOUT)
    run = MlflowClient(uri).get_run(again)
    assert reopened and again == run_id and run.info.run_name == "renamed"


def test_each_resume_is_an_event_and_a_line_of_the_description(tmp_path):
    """With what changed since the last start; the params keep their first values
    (MLflow's are immutable), credentials are redacted."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = RunTracking(uri, "tests", str(tmp_path / "artifacts"))
    first = {"train.lr": 0.003, "train.steps": 10, "tracking.uri": "sqlite:///a.db"}
    second = {"train.lr": 0.001, "train.steps": 20, "tracking.uri": "postgresql://u:pw@db/x",
              "tracking.new_key": 1}
    run_id, _ = tracking.open(tmp_path, "r", first, ABOUT)
    again, reopened = tracking.open(tmp_path, "r", second, ABOUT)
    assert reopened and again == run_id
    tracking.record_resume(run_id, 10, changes(first, second), ABOUT)
    tracking.record_resume(run_id, 20, [], ABOUT)
    run = MlflowClient(uri).get_run(run_id)
    tags = run.data.tags
    changed = ("tracking.new_key: None -> 1; tracking.uri: 'sqlite:///a.db' -> "
               "'postgresql://u:***@db/x'; train.lr: 0.003 -> 0.001; train.steps: 10 -> 20")
    assert tags["raytron.event.resume_1"].endswith(f"resume 1: from step 10, changed {changed}")
    assert tags["raytron.event.resume_2"].endswith("resume 2: from step 20, nothing changed")
    note = tags[NOTE_TAG].split("\n")
    assert note[:2] == [ABOUT, ""] and len(note) == 4
    assert note[2].startswith("- ") and note[2].endswith(f"resumed from step 10, changed {changed}")
    assert note[3].startswith("- ") and note[3].endswith("resumed from step 20, nothing changed")
    assert "pw" not in str(tags) and "tracking.new_key" not in run.data.params
    assert run.data.params["train.lr"] == "0.003" and run.data.params["train.steps"] == "10"


def test_a_long_description_drops_its_oldest_resumes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = RunTracking(uri, "tests", str(tmp_path / "artifacts"))
    run_id, _ = tracking.open(tmp_path, "r", {}, ABOUT)
    for step in range(1, 13):
        tracking.record_resume(run_id, step, [f"data.x: {'y' * 600}"], ABOUT)
    note = MlflowClient(uri).get_run(run_id).data.tags[NOTE_TAG]
    assert note.startswith(ABOUT + "\n\n- ") and len(note) <= 5000
    assert "resumed from step 12," in note and "resumed from step 1," not in note
    MlflowClient(uri).set_tag(run_id, NOTE_TAG, "edited in the UI " * 400)
    tracking.record_resume(run_id, 13, ["data.x: 'a' -> 'b'"], ABOUT)
    note = MlflowClient(uri).get_run(run_id).data.tags[NOTE_TAG]
    assert note.startswith("edited in the UI") and len(note) <= 5000
    assert note.endswith("resumed from step 13, changed data.x: 'a' -> 'b'")


def test_experiments_open_in_the_training_view_and_links_say_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    tracking = RunTracking(uri, "new", str(tmp_path / "a"))
    key, value = EXPERIMENT_KIND_TAG
    assert (key, value) == ("mlflow.experimentKind", "custom_model_development")
    assert client.get_experiment(tracking.experiment_id).tags[key] == value
    older = client.create_experiment("older")  # as raytron created them before the tag
    assert RunTracking(uri, "older", None).experiment_id == older
    assert client.get_experiment(older).tags[key] == value
    assert run_url(uri, "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert run_url("https://u:pw@mlflow.example.com/base/", "3", "abc") == (
        "https://mlflow.example.com/base/#/experiments/3/runs/abc?workflowType=machine_learning")


STARTUP = {"group_s": 5.12, "build_s": 3.0, "load_s": 0.44, "first_step_s": 5.7,
           "total_s": 14.2}


def train_a_run(tracking: RunTracking, folder, name: str, layout: int, steps: int) -> str:
    """A run's records as workers send them: launch, losses, validations, throughput."""
    folder.mkdir()
    run_id, _ = tracking.open(folder, name, {"train.steps": steps}, ABOUT)
    tracker = Tracker(tracking.uri, run_id)
    tracker.launched(0, {"pp": 1, "dp": layout, "tp": 1, "workers": layout}, STARTUP)
    for step in range(1, steps + 1):
        tracker.log(step, {names.TRAIN_LOSS: 8.0 / step, names.TOKENS_PER_S: 1000.0 + step,
                           names.MFU: 0.3, names.STEP_TIME_S: 0.1, names.INPUT_WAIT_S: 0.01,
                           "lr": 1e-3, "data/pipeline_tokens_per_s": 1e4,
                           "pipeline/idle": 0.0})
        if step % 5 == 0:
            tracker.log(step, {names.VAL_LOSS: 9.0 / step, names.VAL_PERPLEXITY: 2.0 + 1 / step})
    tracking.finish(run_id, "FINISHED")
    return run_id


def run_page_sections(metrics) -> list[str]:
    """The sections of MLflow's "Model metrics" tab, in its order: by the prefix before
    "/" in code-point order, then the names without one; `system/` has its own tab."""
    prefixes = {name.split("/")[0] for name in metrics if "/" in name} - {"system"}
    return sorted(prefixes) + (["Model metrics"] if any("/" not in n for n in metrics) else [])


def test_the_loss_is_the_first_section_of_the_run_page_and_launches_are_events(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = RunTracking(uri, "raytron", str(tmp_path / "artifacts"))
    run_id = train_a_run(tracking, tmp_path / "run", "run", 2, 5)
    tracker = Tracker(uri, run_id)  # a restarted group, smaller
    tracker.launched(3, {"pp": 1, "dp": 1, "tp": 1, "workers": 1}, STARTUP)
    run = MlflowClient(uri).get_run(run_id)
    assert run_page_sections(run.data.metrics) == ["Loss", "Throughput", "data", "pipeline",
                                                   "Model metrics"]
    assert {names.TRAIN_LOSS, names.VAL_LOSS, names.VAL_PERPLEXITY, names.TOKENS_PER_S,
            names.MFU} <= set(run.data.metrics)
    assert not [name for name in run.data.metrics if name.startswith(("layout/", "startup/"))]
    tags = run.data.tags
    assert tags[LAYOUT_TAG] == "pp=1 dp=1 tp=1 (1 worker)"
    assert tags["raytron.event.launch_1"].endswith(
        "launch 1: pp=1 dp=2 tp=1 (2 workers) from step 0; up in 14.2 s: Ray 5.1 s, "
        "build 3.0 s, checkpoint 0.4 s, first step 5.7 s")
    assert "launch 2: pp=1 dp=1 tp=1 (1 worker) from step 3;" in tags["raytron.event.launch_2"]
    assert tags[NOTE_TAG] == ABOUT


def test_runs_are_tabled_newest_first_with_plots_and_source_tags(tmp_path):
    import subprocess
    from pathlib import Path

    from raytron.platform.control.runs_table import run_rows, runs_table

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = RunTracking(uri, "raytron", str(tmp_path / "artifacts"))
    first = train_a_run(tracking, tmp_path / "first", "first", 1, 10)
    second = train_a_run(tracking, tmp_path / "second", "second", 4, 15)
    rows = run_rows(uri, "raytron", 10)
    assert [row[:3] for row in rows] == [("second", "FINISHED", "15"),
                                         ("first", "FINISHED", "10")]
    assert rows[0][3:7] == (f"{8 / 15:.4f}", f"{2 + 1 / 15:.2f}", "1x4x1", "0")
    assert runs_table(uri, "raytron", 10).splitlines()[0].split()[:3] == ["name", "state",
                                                                          "step"]
    client = MlflowClient(uri)
    for run_id in (first, second):
        plots = {a.path: a.file_size for a in client.list_artifacts(run_id, "plots")}
        assert set(plots) == {"plots/loss.png", "plots/throughput.png"}
        assert all(size > 10_000 for size in plots.values())  # a drawn chart, not a blank
        png = Path(client.download_artifacts(run_id, "plots/loss.png", str(tmp_path)))
        assert png.read_bytes()[:4] == b"\x89PNG"
    tags = client.get_run(first).data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"].startswith("raytron")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    if commit.returncode == 0:  # tests run from a git checkout of raytron
        assert tags["mlflow.source.git.commit"] == commit.stdout.strip()


def test_system_metrics_are_sampled_in_the_background_and_logged_per_node(tmp_path):
    """As MLflow's SystemMetricsMonitor(node_id=...) names them, at the latest training
    step, every interval and once more when stopped."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = RunTracking(uri, "tests", str(tmp_path / "artifacts"))
    run_id, _ = tracking.open(tmp_path, "r", {}, ABOUT)
    tracker = Tracker(uri, run_id)
    tracker.log(7, {names.TRAIN_LOSS: 3.0})
    sampler = SystemSampler(tracker.log_system, interval_s=0.2, node="node-1")
    time.sleep(0.5)
    sampler.stop()
    assert not sampler.thread.is_alive()
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes",
                 "system_memory_usage_percentage", "disk_usage_percentage",
                 "network_receive_megabytes"):
        assert f"system/node-1/{name}" in metrics, sorted(metrics)
    history = client.get_metric_history(run_id, "system/node-1/system_memory_usage_megabytes")
    assert len(history) >= 3 and {m.step for m in history} == {7}
    assert all(m.value > 0 for m in history)


def test_one_worker_per_node_samples_unless_turned_off():
    from raytron.platform.config.load import load_config

    def sampler_of(local_rank: int, *overrides: str):
        config = load_config("tiny", list(overrides))
        loop = SimpleNamespace(local_rank=local_rank, config=config,
                               args=SimpleNamespace(tracker=None))
        return WorkerLoop.system_sampler(loop)

    assert sampler_of(1) is None and sampler_of(0, "tracking.system_metrics=false") is None
    assert node_name() and "/" not in node_name()


def test_the_source_names_the_command_and_config_and_the_whole_line_is_kept(monkeypatch):
    from raytron.platform.storage.tracking import source_tags

    monkeypatch.setattr("sys.argv", ["raytron", "train", "configs/sft-tiny.yaml",
                                     "run.root=/mnt/runs", "tracking.uri=http://u:pw@host"])
    tags = source_tags()
    assert tags["mlflow.source.name"] == "raytron train sft-tiny.yaml"  # what the page shows
    assert tags["raytron.command"] == ("raytron train configs/sft-tiny.yaml run.root=/mnt/runs "
                                       "tracking.uri=http://u:***@host")


def test_mfu_needs_a_stated_peak_and_a_cpu_has_none():
    """A CPU's measured matmul rate moved with the other work on its cores (MFU 23% to
    133% at one step time): on a CPU only a configured train.peak_flops gives MFU."""
    import torch

    from raytron.platform.control.console import format_step
    from raytron.platform.worker.hardware import peak_flops

    assert peak_flops(torch.device("cpu"), None) is None
    assert peak_flops(torch.device("cpu"), 1e12) == 1e12
    metrics = {names.TRAIN_LOSS: 5.0, "lr": 1e-3, "grad_norm": 1.0, names.TOKENS_PER_S: 8000.0,
               names.STEP_TIME_S: 0.25, names.INPUT_WAIT_S: 0.001}
    assert "MFU" not in format_step(10, 200, metrics)
    assert "| MFU 30.0% |" in format_step(10, 200, {**metrics, names.MFU: 0.3})


def test_the_training_bar_starts_with_the_first_step_not_with_ray(monkeypatch):
    """Its rate and time left count training: the bar begins at the first step a worker
    group reports (and again after a relaunch), not while Ray starts the group."""
    from raytron.platform.control import console as consoles

    bars: list[dict] = []

    class Bar:  # tqdm as the console uses it, recording how each bar starts
        disable, n = False, 0

        def __init__(self, **options):
            bars.append(options)
            self.n = options["initial"]

        def update(self, count: int) -> None:
            self.n += count

        def set_postfix(self, **_) -> None: ...

        def close(self) -> None: ...

        write = staticmethod(lambda text: None)

    monkeypatch.setattr(consoles, "tqdm", Bar)
    line = {names.TRAIN_LOSS: 5.0, "lr": 1e-3, "grad_norm": 1.0, names.TOKENS_PER_S: 8000.0,
            names.STEP_TIME_S: 0.25, names.INPUT_WAIT_S: 0.001}
    console = consoles.Console(200, 0)
    assert bars == []  # nothing to time while Ray starts
    console.show([(1, line), (10, line)])
    assert [bar["initial"] for bar in bars] == [1] and console.bar.n == 10
    console.show([(10, {"event": "Resuming from step 10"}), (11, line)])  # a relaunch
    assert [bar["initial"] for bar in bars] == [1, 11] and console.step == 11


def test_peak_memory_belongs_to_its_logging_window():
    """A peak is the window's, not the process's: 400 MB held and freed in one window is
    not in the next one's peak."""
    import numpy as np
    import torch

    from raytron.platform.worker.hardware import memory_peaks

    cpu = torch.device("cpu")
    memory_peaks(cpu)  # a window starts
    held = np.ones(50_000_000)  # 400 MB, touched
    del held
    busy = memory_peaks(cpu)["peak"]
    quiet = memory_peaks(cpu)["peak"]
    assert busy - quiet > 0.35
