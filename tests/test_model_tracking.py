"""What eval and export leave in MLflow: metrics on the run's MLflow run, and the exported
model logged as a transformers model and registered, loadable by MLflow itself."""


import os

import pytest
from mlflow import MlflowClient

from raytron.platform.models import load_model
from raytron.platform.models.export import global_tracking_uri

from model_runs import run_cli, small_model, small_tokenizer, write_run


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("raytron", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment, run_name="tracked").info.run_id
    client.set_terminated(run_id, status="FINISHED")
    run_dir = write_run(root, "tracked", small_model(512), small_tokenizer(), step=30,
                        tracking=(uri, run_id))
    return run_dir, client, run_id


def test_eval_logs_to_the_runs_mlflow_run(tracked_run, tmp_path):
    run_dir, client, run_id = tracked_run
    corpus = tmp_path / "notes.txt"
    corpus.write_text("The import statement finds a module and binds a name. " * 30)
    code, printed, err = run_cli("eval", str(run_dir), "--data", str(corpus))
    assert code == 0, err
    assert (run_dir / "eval" / "notes_step30.json").is_file()
    metrics = client.get_run(run_id).data.metrics
    assert f"{metrics['eval/notes/loss']:.4f}" in printed
    assert metrics["eval/notes/perplexity"] > 1
    history = client.get_metric_history(run_id, "eval/notes/loss")
    assert [m.step for m in history] == [30]
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/notes_step30.json"]


def test_task_scores_log_to_the_runs_mlflow_run(tracked_run, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir, client, run_id = tracked_run
    code, printed, err = run_cli("eval", str(run_dir), "--tasks", "raytron_next_line",
                                 "--limit", "5")
    assert code == 0, err
    history = client.get_metric_history(run_id, "eval/raytron_next_line/acc")
    assert [m.step for m in history] == [30] and 0 <= history[0].value <= 1
    assert "eval/tasks_step30.json" in [a.path for a in client.list_artifacts(run_id, "eval")]
    assert f"Logged 2 eval/<task>/<metric> values to MLflow run {run_id}" in printed


def test_export_logs_and_registers_a_transformers_model(tracked_run, tmp_path):
    import mlflow

    run_dir, client, run_id = tracked_run
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    code, printed, err = run_cli("export", str(run_dir), str(tmp_path / "hf"),
                                 "--register", "tiny-test")
    assert os.environ.get("MLFLOW_TRACKING_URI") == environment
    assert code == 0, err
    versions = client.search_model_versions("name='tiny-test'")
    assert [v.run_id for v in versions] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"  # the finished run stays so
    with global_tracking_uri(client.tracking_uri):
        pipeline = mlflow.transformers.load_model("models:/tiny-test/1")
    assert os.environ.get("MLFLOW_TRACKING_URI") == environment  # later runs log elsewhere
    prompt = "The import statement"
    theirs = pipeline(prompt, max_new_tokens=12, do_sample=False,
                      return_full_text=False)[0]["generated_text"]
    ours = load_model(run_dir).generate(prompt, max_new_tokens=12, greedy=True)[0].text
    assert theirs == ours


def test_export_to_mlflow_needs_a_run(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=4)
                     ).save_pretrained(tmp_path / "hf")
    small_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    code, _, err = run_cli("export", str(tmp_path / "hf"), str(tmp_path / "out"), "--mlflow")
    assert code == 2 and "--run-id" in err
    assert not (tmp_path / "out").exists()
