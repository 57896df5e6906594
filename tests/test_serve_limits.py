"""What `raytron serve` refuses before Ray starts (an empty key, a reachable host without
one, a taken port), the replica's admission limit, the constant-time key check, and
request metrics that stay bounded and survive MLflow failing; no Ray here."""

import argparse
import hmac
import logging
import socket
import subprocess
import sys
import time

import pytest

from raytron.platform.config.schema import ConfigError
from raytron.platform.serving import access
from raytron.platform.serving.command import add_serve_arguments, api_key
from raytron.platform.serving.limits import Admission, Limits
from raytron.platform.serving.metrics import EXPERIMENT, LATENCIES, RequestMetrics, Served

from model_runs import run_cli, small_model, small_tokenizer, write_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("runs"), "served", small_model(512),
                     small_tokenizer())


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(["runs/x", *argv])


def test_an_empty_key_is_refused_and_a_reachable_host_needs_one(monkeypatch):
    monkeypatch.delenv("RAYTRON_API_KEY", raising=False)
    assert api_key(serve_args()) is None  # 127.0.0.1: this machine only
    for host in ("localhost", "::1", "127.0.0.2"):
        assert api_key(serve_args("--host", host)) is None
    assert api_key(serve_args("--host", "0.0.0.0", "--api-key", "k")) == "k"
    assert api_key(serve_args("--host", "0.0.0.0", "--allow-unauthenticated")) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost"):
        with pytest.raises(ConfigError, match=f"--host {host} lets other machines reach the "
                                              "server, and no API key is given"):
            api_key(serve_args("--host", host))
    with pytest.raises(ConfigError, match="--api-key is empty"):
        api_key(serve_args("--api-key", ""))
    monkeypatch.setenv("RAYTRON_API_KEY", "")
    with pytest.raises(ConfigError, match=r"\$RAYTRON_API_KEY is empty, and an empty API key "
                                          "would let anyone in"):
        api_key(serve_args())
    monkeypatch.setenv("RAYTRON_API_KEY", "from-env")
    assert api_key(serve_args("--host", "0.0.0.0")) == "from-env"


def test_an_empty_key_stops_serve_and_the_application_before_ray(run_dir, monkeypatch):
    """`raytron serve`, Serve's builder (`serve run`, a RayService) and `build_app`."""
    from raytron.platform.serving.app import ServeArgs, application, build_app

    monkeypatch.setenv("RAYTRON_API_KEY", " ")
    code, _, err = run_cli("serve", str(run_dir))
    assert code == 2 and "$RAYTRON_API_KEY is empty" in err
    with pytest.raises(ValueError, match=r"\$RAYTRON_API_KEY is empty"):
        application(ServeArgs(source=str(run_dir)))
    with pytest.raises(ValueError, match="the API key is empty"):
        build_app(str(run_dir), "small", api_key="")


def test_the_key_is_compared_in_constant_time(monkeypatch):
    compared, constant_time = [], hmac.compare_digest

    def compare_digest(a, b):
        compared.append((a, b))
        return constant_time(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", compare_digest)
    assert access.authorized("Bearer s3cret", "s3cret")
    assert not access.authorized("Bearer s3cre", "s3cret")
    assert not access.authorized(None, "s3cret")
    assert not access.authorized("Bearer s3crét", "s3cret")  # not ASCII: no TypeError
    assert len(compared) == 4


def test_a_replica_admits_up_to_its_limit():
    admission = Admission(2)
    assert [admission.admit() for _ in range(3)] == [True, True, False]
    admission.release()
    assert admission.admit() and not admission.admit()
    assert Limits(8).serve_options() == {"max_ongoing_requests": 16, "max_queued_requests": 8}
    with pytest.raises(ValueError, match="max_queued must be at least 1"):
        Limits(0)
    with pytest.raises(ValueError, match="request_timeout_s must be more than 0"):
        Limits(1, 0)


def test_a_taken_port_is_refused_before_ray_starts(run_dir):
    """A port any program holds: exit 2, the port named, in seconds, without Ray."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.time()
        result = subprocess.run([sys.executable, "-m", "raytron.platform.cli", "serve",
                                 str(run_dir), "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"port {port} on 127.0.0.1 is taken by another program. Fix: stop it, or give " \
           "another --port" in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr + result.stdout
    assert time.time() - started < 60


def test_request_metrics_stay_bounded_and_survive_mlflow_failing(tmp_path, caplog):
    from mlflow import MlflowClient

    assert RequestMetrics("small", None).window.requests == 0  # nothing kept without MLflow
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    metrics = RequestMetrics("small", uri)
    for index in range(LATENCIES + 5):
        metrics.record(Served("/v1/completions", 200 if index else 500, 0.1, 1, 2))
    assert metrics.window.requests == LATENCIES + 5
    assert len(metrics.window.latencies) == LATENCIES
    mlflow = MlflowClient(uri)
    mlflow.delete_run(metrics.run_id)  # MLflow now refuses the run's metrics
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        metrics.flush()
    assert f"{LATENCIES + 5} requests' metrics not logged to MLflow" in caplog.text
    mlflow.restore_run(metrics.run_id)
    metrics.record(Served("/v1/completions", 200, 0.2, 1, 2))
    metrics.flush()
    run = mlflow.search_runs([mlflow.get_experiment_by_name(EXPERIMENT).experiment_id])[0]
    assert run.data.metrics["serve/requests"] == 1


def test_the_rayservice_requires_its_api_key():
    """Every pod of the RayService takes $RAYTRON_API_KEY from the Secret, not optional:
    without it a pod does not start, rather than serving anyone."""
    import yaml

    from conftest import REPO

    text = (REPO / "cluster" / "rayservice.yaml").read_text()
    keys = []
    pending = [yaml.safe_load(text)]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if item.get("name") == "RAYTRON_API_KEY":
                keys.append(item["valueFrom"]["secretKeyRef"])
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    assert len(keys) == 2  # the head's and the GPU workers'
    assert all(k == {"name": "raytron-api-key", "key": "api-key"} for k in keys)


def test_the_command_says_what_serve_waits_for_and_gives_up_once():
    """Serve's own wait is silent and endless when a replica cannot be placed."""
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatus,
        DeploymentStatusOverview,
        DeploymentStatusTrigger,
        ReplicaState,
    )

    from raytron.platform.serving.readiness import ServeStartFailed, wait_until_running

    def application(status: str, message: str = "") -> ApplicationStatusOverview:
        pending = DeploymentStatusOverview(
            DeploymentStatus.UPDATING, DeploymentStatusTrigger.CONFIG_UPDATE_STARTED,
            {ReplicaState.STARTING: 2}, "1 replica has taken more than 30s to be scheduled")
        return ApplicationStatusOverview(ApplicationStatus(status), message, 0.0,
                                         {"ModelServer": pending})

    now = [0.0]
    said: list[str] = []
    statuses = iter([None, *[application("DEPLOYING")] * 2, application("RUNNING")])
    wait_until_running(lambda: next(statuses), 60, said.append, clock=lambda: now[0],
                       sleep=lambda s: now.__setitem__(0, now[0] + 20))
    assert said == ["Waiting for the replicas (40 s): ModelServer: updating (2 starting): "
                    "1 replica has taken more than 30s to be scheduled"]
    with pytest.raises(ServeStartFailed, match="within --start-timeout-s 60: ModelServer"):
        wait_until_running(lambda: application("DEPLOYING"), 60, said.append,
                           clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + 7))
    with pytest.raises(ServeStartFailed, match="failed to start: import failed; ModelServer"):
        wait_until_running(lambda: application("DEPLOY_FAILED", "import failed"), 60,
                           said.append)
