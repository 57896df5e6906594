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
