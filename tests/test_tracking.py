"""MLflow tracking: a fallback to an older checkpoint is shown and tagged; a reopened run
takes its new name; nothing sent to MLflow carries a credential."""

from mlflow import MlflowClient

from raytron.platform.storage.tracking import RunTracking, Tracker


def test_a_resume_names_the_step_it_loaded_and_tags_each_fallback(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = RunTracking(uri, "tests", str(tmp_path / "artifacts"))
    run_id, reopened = tracking.open(tmp_path, "first", {"train.lr": 0.003})
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

    again, reopened = tracking.open(tmp_path, "renamed", {"train.lr": 0.001})
    run = MlflowClient(uri).get_run(again)
    assert reopened and again == run_id and run.info.run_name == "renamed"
    assert run.data.tags["raytron.resumed_with"] == "train.lr: 0.003 -> 0.001"


def train_a_run(tracking: RunTracking, folder, name: str, layout: int, steps: int) -> str:
    """A run's records as workers send them: layout, losses, validations, throughput."""
    folder.mkdir()
    run_id, _ = tracking.open(folder, name, {"train.steps": steps})
    tracker = Tracker(tracking.uri, run_id)
    tracker.log(1, {"layout/pp": 1, "layout/dp": layout, "layout/tp": 1})
    for step in range(1, steps + 1):
        tracker.log(step, {"loss": 8.0 / step, "tokens_per_s": 1000.0 + step, "mfu": 0.3})
        if step % 5 == 0:
            tracker.log(step, {"val_loss": 9.0 / step, "val_perplexity": 2.0 + 1 / step})
    tracking.finish(run_id, "FINISHED")
    return run_id


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
