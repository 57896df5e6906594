"""`raytron submit` and plain `ray job submit`: a run's paths made absolute or refused, no
credentials shipped, Ray's token found where Ray keeps it; then, on a Ray cluster this test
starts (`ray start --head` on 127.0.0.1 with token authentication, its own ports and temp
dir), a training submitted both ways lands in MLflow with its metrics, and a model
submitted for serving answers the `openai` client."""

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from process_trees import kill_tree

from raytron.platform.cli import EXIT_CONFIG_ERROR, main
from raytron.platform.config.load import load_config
from raytron.platform.config.schema import ConfigError
from raytron.platform.control import submit as submitting
from raytron.platform.storage.metric_names import TRAIN_LOSS, VAL_LOSS

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.n_layers=2", "data.seq_len=64", "train.global_batch=8", "train.micro_batch=4",
        "train.steps=6", "train.warmup_steps=2", "train.log_interval=2",
        "train.eval_interval=6", "checkpoint.interval=6", "cluster.cpus_per_worker=1",
        "cluster.dashboard=false"]
REMOTE = "http://10.20.30.40:8265"


def test_relative_paths_become_absolute_for_a_cluster_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("tiny", ["run.root=runs", "data.tokenizer=tok.json",
                                  "tracking.uri=sqlite:///runs/mlflow.db",
                                  "data.sources=[corpus/, s3://bucket/x.jsonl]",
                                  "cluster.address=127.0.0.1:6379"])
    job = submitting.with_absolute_paths(config, local=True)
    assert job.run.root == str(tmp_path / "runs")
    assert job.checkpoint.dir == str(tmp_path / "runs" / "tiny" / "checkpoints")
    assert job.tracking.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert job.data.tokenizer == str(tmp_path / "tok.json")
    assert [s.path for s in job.data.sources] == [str(tmp_path / "corpus"), "s3://bucket/x.jsonl"]
    assert job.cluster.address is None  # the job joins the cluster it runs in


def test_relative_paths_are_refused_for_a_remote_cluster():
    config = load_config("tiny", ["data.sources=[corpus/]"])
    with pytest.raises(ConfigError) as refused:
        submitting.with_absolute_paths(config, local=False)
    text = str(refused.value)
    for key in ("run.root=runs", "checkpoint.dir=runs/tiny/checkpoints", "data.sources.0.path"):
        assert key in text
    assert "temporary directory" in text and "/mnt/raytron" in text
    absolute = load_config("tiny", ["run.root=/mnt/raytron/runs"])  # embedded corpus: no path
    assert submitting.with_absolute_paths(absolute, local=False).run.root == "/mnt/raytron/runs"


def test_a_config_with_credentials_is_not_shipped():
    config = load_config("tiny", ["run.root=/mnt/runs",
                                  "tracking.uri=http://alice:s3cret@mlflow:5000"])
    with pytest.raises(ConfigError, match="credentials"):
        submitting.training_submission(config, local=False)


def test_the_config_travels_as_a_file_not_on_the_command_line():
    config = load_config("tiny", ["run.root=/mnt/runs", "run.name=big", "train.steps=7"])
    job = submitting.training_submission(config, local=False)
    assert job.arguments == ["train", "big.yaml"]
    assert load_config_text(job.files["big.yaml"]).train.steps == 7


def load_config_text(text: str):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "shipped.yaml"
        path.write_text(text)
        return load_config(str(path))


def test_the_lines_a_submission_waits_for_are_those_raytron_prints():
    from raytron.platform.storage.tracking import run_url

    url = run_url("http://mlflow:5000", "3", "abc123")
    printed = f"MLflow run abc123 (new) in http://mlflow:5000\n  {url}\nLayout pp=1"
    assert submitting.MLFLOW_RUN_URL.search(printed).group() == url
    serving = ("Serving 'sft' (run step 500 of /mnt/runs/sft) at http://0.0.0.0:8000/v1 with 1 "
               "replica(s).")
    assert submitting.SERVING_LINE.search(serving).group() == serving.split(" with")[0]


def test_serving_options_are_checked_before_anything_is_sent(tmp_path):
    with pytest.raises(ConfigError, match="raytron serve"):
        submitting.serving_submission("/mnt/runs/tiny", ["--replicas", "zero"], False)
    with pytest.raises(ConfigError, match="RAYTRON_API_KEY"):
        submitting.serving_submission("/mnt/runs/tiny", ["--api-key", "k"], False)
    with pytest.raises(ConfigError, match="absolute path"):
        submitting.serving_submission("runs/tiny", [], False)
    job = submitting.serving_submission("/mnt/runs/tiny", ["--port", "9000"], False)
    assert job.arguments == ["serve", "/mnt/runs/tiny", "--port", "9000", "--detach"]


def test_the_shipped_package_is_raytron_without_bytecode(tmp_path):
    package = submitting.shipped_package(tmp_path)
    assert package.name == "raytron"
    assert sorted(p.name for p in package.iterdir()) == ["configs", "model", "pipelines",
                                                          "platform"]
    assert (package / "platform" / "cli.py").is_file()
    assert (package / "configs" / "tiny.yaml").is_file()
    assert not list(package.rglob("__pycache__"))


def test_the_ray_token_is_found_where_ray_keeps_it(tmp_path, monkeypatch):
    for variable in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submitting.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submitting.auth_headers() == {"Authorization": "Bearer from-home"}
    (tmp_path / "token").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert submitting.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submitting.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submitting.auth_headers() == {}


def test_bad_input_is_refused_before_the_cluster_is_contacted(capsys, monkeypatch):
    def must_not_connect(address):
        raise AssertionError("the cluster was contacted for an invalid submission")

    monkeypatch.setattr(submitting, "connect", must_not_connect)
    assert main(["submit", "tiny", "model.n_heads=3", "--address", REMOTE]) == EXIT_CONFIG_ERROR
    assert main(["submit", "tiny", "train.global_batch=7", "--address", REMOTE]) \
        == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert "cannot submit" in err and "n_heads" in err and "global_batch" in err
    assert "Traceback" not in err


class RecordingClient:
    """Ray's JobSubmissionClient as `submit` uses it: it records the job, which has ended."""

    def __init__(self):
        self.jobs: list[dict] = []

    def submit_job(self, **job):
        self.jobs.append(job)

    def get_job_status(self, job_id):
        return "JobStatus.SUCCEEDED"

    def get_job_logs(self, job_id):
        return ""

    def get_job_info(self, job_id):
        return SimpleNamespace(status="JobStatus.SUCCEEDED", message="", driver_exit_code=0)


def test_the_jobs_command_line_runs_nothing_its_arguments_spell(tmp_path):
    pwned = tmp_path / "pwned"
    job = submitting.serving_submission(f"/mnt/runs/x;touch {pwned}",
                                        ["--name", f"a b' $(touch {pwned})", "--host", "*"],
                                        local=False)
    client = RecordingClient()
    assert submitting.submit(client, job, REMOTE, False, 1.0, lambda *_, **__: None) == 0
    entrypoint = client.jobs[0]["entrypoint"]
    assert shlex.split(entrypoint) == [*shlex.split(submitting.ENTRYPOINT), *job.arguments]
    shell = subprocess.run(["sh", "-c", entrypoint.replace(submitting.ENTRYPOINT, "true", 1)],
                           cwd=tmp_path, check=False)
    assert shell.returncode == 0 and not pwned.exists()


def test_a_run_name_that_is_no_plain_name_is_never_submitted(capsys, monkeypatch):
    monkeypatch.setattr(submitting, "connect", lambda address: pytest.fail("contacted"))
    assert main(["submit", "tiny", "run.name=x;id", "run.root=/mnt/runs", "--address",
                 REMOTE]) == EXIT_CONFIG_ERROR
    assert "run.name='x;id' must be one folder name of letters" in capsys.readouterr().err


def test_an_unreachable_cluster_is_a_clear_error(capsys):
    assert main(["submit", "tiny", "run.root=/tmp/x", "--address",
                 f"http://127.0.0.1:{free_port()}"]) == EXIT_CONFIG_ERROR
    assert "cannot reach the Ray cluster's dashboard" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with token authentication (the token in a home of its own,
    where `ray start` and raytron look for it); stopped, with everything it started, at the
    end. Yields (dashboard address, environment of this machine's commands, runs root)."""
    base = Path(tempfile.mkdtemp(prefix="rtsub"))  # short: Ray's socket paths are limited
    home = base / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(os.urandom(16).hex())
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env |= {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
            "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4",
         f"--temp-dir={base / 'ray'}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for(f"{address}/api/version", head)
        yield address, env, base / "runs"
    finally:
        kill_tree(head.pid)  # at once: SIGTERM would have Ray drain its node first
        head.wait()
        shutil.rmtree(base, ignore_errors=True)


def wait_for(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the Ray head exited"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # it answers, if only to ask for the token
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} never answered")


def run(command: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def submitted(cluster):
    """`raytron submit --follow`, with nothing exported: the token comes from ~/.ray."""
    address, env, root = cluster
    return run(["raytron", "submit", "tiny", *TINY, f"run.root={root}", "run.name=submitted",
                "--address", address, "--follow"], env)


@pytest.fixture(scope="module")
def plain(cluster):
    """Plain `ray job submit --working-dir .`, which needs RAY_AUTH_MODE=token exported."""
    address, env, root = cluster
    return run(["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
                "raytron", "train", "tiny", *TINY, f"run.root={root}", "run.name=plain"],
               env | {"RAY_AUTH_MODE": "token"})


def test_a_cluster_on_this_machine_is_told_from_a_remote_one(cluster, monkeypatch):
    address, env, _ = cluster
    monkeypatch.setenv("HOME", env["HOME"])  # where the cluster's token is
    assert submitting.runs_on_this_machine(address)
    monkeypatch.setenv("HOME", "/nonexistent")  # no token: the dashboard does not say
    assert not submitting.runs_on_this_machine(address)
    assert not submitting.runs_on_this_machine(f"http://127.0.0.1:{free_port()}")


def test_raytron_submit_follows_the_job_to_its_end(submitted):
    out = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, out[-4000:]
    assert "Submitted job raytron-submitted-" in out
    assert "Ray dashboard: http://127.0.0.1:" in out and "/#/jobs/raytron-submitted-" in out
    assert "step 6/6" in out and "succeeded" in out
    assert "workflowType=machine_learning" in out  # the MLflow run's address, printed
    assert "Uploading package" not in out  # Ray's own chatter


def test_both_submissions_are_tracked_in_mlflow(cluster, submitted, plain):
    from mlflow import MlflowClient

    assert plain.returncode == 0, (plain.stdout + plain.stderr)[-4000:]
    root = cluster[2]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raytron")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"submitted", "plain"}
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, TRAIN_LOSS)) >= 3
        assert VAL_LOSS in run.data.metrics
        assert run.data.params["run.root"] == str(root)
    assert (root / "submitted" / "checkpoints").is_dir()  # not in the job's temporary dir


def test_raytron_submit_serve_puts_an_endpoint_on_the_cluster(cluster, submitted):
    from openai import OpenAI

    address, env, root = cluster
    port = free_port()
    served = run(["raytron", "submit", "--serve", str(root / "submitted"), "--address",
                  address, "--", "--port", str(port), "--name", "tiny"], env)
    out = served.stdout + served.stderr
    assert served.returncode == 0, out[-4000:]
    assert f"\n  Serving 'tiny' (run step 6 of {root / 'submitted'}) at " \
           f"http://127.0.0.1:{port}/v1" in out  # the line it waited for, found and shown
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    completion = client.completions.create(model="tiny", prompt="To be", max_tokens=4)
    assert completion.usage.completion_tokens >= 1
