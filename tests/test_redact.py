"""Credentials in URIs are redacted everywhere raytron writes them, and only there."""

import contextlib
import io

import pytest

from raytron.platform.cli import main
from raytron.platform.config.load import load_config
from raytron.platform.config.redact import redact_text, redact_uri, redacted
from raytron.platform.control.console import ConsoleStream


@pytest.mark.parametrize(("uri", "expected"), [
    ("postgresql://user:pass@host:5432/db", "postgresql://user:***@host:5432/db"),
    ("https://token@host/path", "https://***@host/path"),
    ("https://host/x?key=abc&region=eu#top", "https://host/x?key=***&region=***#top"),
    ("mysql+pymysql://u:p%40ss@db/mlflow?ssl=true", "mysql+pymysql://u:***@db/mlflow?ssl=***"),
    ("sqlite:////abs/runs/mlflow.db", "sqlite:////abs/runs/mlflow.db"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("https://host/a@b", "https://host/a@b"),  # an @ in the path is no userinfo
    ("http://h:5000/#/experiments/1/runs/r?workflowType=machine_learning&token=t",  # a view
     "http://h:5000/#/experiments/1/runs/r?workflowType=machine_learning&token=***"),
])
def test_uris_are_redacted(uri, expected):
    assert redact_uri(uri) == expected


def test_text_and_configs_are_redacted_and_the_real_value_kept():
    text = "MLflow run 1 in http://alice:s3cret@10.0.0.1:5000, ray at ray://tok@head:10001."
    assert redact_text(text) == ("MLflow run 1 in http://alice:***@10.0.0.1:5000, ray at "
                                 "ray://***@head:10001.")
    config = load_config("tiny", ["tracking.uri=postgresql://u:pw@db/m",
                                  "cluster.address=ray://tok@head:10001"])
    public = redacted(config)
    assert public.tracking.uri == "postgresql://u:***@db/m"
    assert public.cluster.address == "ray://***@head:10001"
    assert config.tracking.uri == "postgresql://u:pw@db/m"  # what the process uses


def test_printed_configs_and_errors_are_redacted(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["config", "tiny", "tracking.uri=https://user:hunter2@mlflow.example",
                     "cluster.address=ray://abc@head:10001"]) == 0
        assert main(["config", "tiny",
                     f"data.sources=[s3://key:hunter2@bucket{tmp_path}/nothing?sig=hunter2]"]) == 2
    printed = out.getvalue() + err.getvalue()
    assert "hunter2" not in printed and "abc@" not in printed
    assert "https://user:***@mlflow.example" in printed and "sig=***" in printed


def test_the_console_drops_rays_noise_and_redacts():
    sink = io.StringIO()
    console = ConsoleStream(sink)
    print("(DataFeeder pid=1) core_worker.cc:2465: Actor with class name: 'MapWorker' has "
          "constructor arguments in the object store and max_restarts > 0.", file=console)
    print("Progress bars disabled. To enable, set ...", file=console)
    print("step 1/2 | loss 7.0 | db postgresql://u:pw@h/d", file=console)
    assert sink.getvalue() == "step 1/2 | loss 7.0 | db postgresql://u:***@h/d\n"
