"""`raytron submit`: `raytron train` (or `raytron serve`) as a Ray job on a cluster, through
Ray's Job Submission SDK.

A job runs in a temporary directory of the cluster, so every path of the run is made
absolute here (for a cluster on this machine) or refused (for a remote one, where this
machine's paths mean nothing). raytron's own code travels with the job (`py_modules`), so
the cluster's image needs only raytron's dependencies; the config travels as a file in the
job's working directory, never on the command line the dashboard shows, and a config with
credentials in it is refused: the cluster gets those from its own environment.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import socket
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from raytron.platform.config.load import to_yaml
from raytron.platform.config.redact import redacted
from raytron.platform.config.schema import ConfigError, RaytronConfig
from raytron.platform.storage.run_dir import absolute, with_locations

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINT = "python -m raytron.platform.cli"  # no console script: raytron is not installed
MLFLOW_RUN_URL = re.compile(r"https?://\S+#/experiments/\S+/runs/\S+")
SERVING_LINE = re.compile(r"Serving '[^']*' .* at http\S+")
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
NODE_LIST_TRIES = 30


@dataclasses.dataclass
class Submission:
    """What goes to the cluster: the command, the files beside it, what to wait for."""

    arguments: list[str]  # after ENTRYPOINT
    files: dict[str, str]  # name -> text, the job's working directory
    name: str  # in the job's id
    wait_for: re.Pattern  # the log line that says the job is under way
    shown_as: str = ""  # what precedes that line when it is printed


def runs_on_this_machine(address: str) -> bool:
    """Whether every node of the cluster is this machine (asked of its dashboard), so that
    this machine's paths are the job's; a port-forwarded remote head is not. False when the
    dashboard does not say: relative paths are then refused rather than guessed at."""
    request = urllib.request.Request(f"{address.rstrip('/')}/nodes?view=hostNameList",
                                     headers=auth_headers())
    for _ in range(NODE_LIST_TRIES):  # a dashboard that just started lists no node yet
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                hosts = json.load(response)["data"]["hostNameList"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if hosts:
            return set(hosts) == {socket.gethostname()}
        time.sleep(1.0)
    return False


def with_absolute_paths(config: RaytronConfig, local: bool) -> RaytronConfig:
    """`config` with its relative paths made absolute (a cluster on this machine), or a
    `ConfigError` naming each of them (a cluster elsewhere)."""
    relative: dict[str, str] = {}

    def note(key: str, path: str) -> str:
        if not Path(path).is_absolute():
            relative[key] = path
        return path

    with_locations(config, note)
    if relative and not local:
        raise ConfigError([
            f"{key}={path} is relative (or in this machine's home): in a Ray job it would land "
            "in the job's temporary directory and be lost when the job ends. Fix: give an "
            f"absolute path on the cluster's shared storage (e.g. {key}=/mnt/raytron/...) or an "
            "s3:// or gs:// URI." for key, path in relative.items()])
    config = with_locations(config, lambda key, path: absolute(path))
    # the job joins the cluster it runs in ($RAY_ADDRESS), not an address of this machine
    return dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, address=None))


def training_submission(config: RaytronConfig, local: bool) -> Submission:
    """The job that trains `config` (validated) on a cluster on this machine (`local`) or
    elsewhere."""
    if redacted(config) != config:
        raise ConfigError([
            "the config carries credentials in a URI (tracking.uri, cluster.address or a "
            "source): a Ray job stores its files on the cluster. Fix: give the cluster its "
            "credentials as environment variables (e.g. MLFLOW_TRACKING_USERNAME/PASSWORD, "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from a Kubernetes Secret, as "
            "cluster/raycluster.yaml does) and drop them from the URI."])
    config = with_absolute_paths(config, local)
    file = f"{config.run.name}.yaml"
    return Submission(["train", file], {file: to_yaml(config)}, config.run.name, MLFLOW_RUN_URL,
                      "MLflow run:    ")


def serving_submission(source: str, options: list[str], local: bool) -> Submission:
    """The job that puts `raytron serve SOURCE OPTIONS --detach` on the cluster."""
    from raytron.platform.serving.command import add_serve_arguments

    parser = argparse.ArgumentParser(prog="raytron submit --serve SOURCE --", add_help=False,
                                     exit_on_error=False)
    add_serve_arguments(parser)
    try:
        serve = parser.parse_args([source, *options])
    except (argparse.ArgumentError, SystemExit) as error:
        raise ConfigError([f"serving options {' '.join(options)!r}: {error}. Fix: give the "
                           "options of `raytron serve` (see `raytron serve --help`) after "
                           "`--`."]) from None
    if serve.api_key:
        raise ConfigError(["--api-key would be shown on the cluster's dashboard with the "
                           "job's command. Fix: give the cluster the key as $RAYTRON_API_KEY "
                           "(a Secret, as cluster/rayservice.yaml does)."])
    path = Path(source).expanduser()
    if not path.is_absolute() and not local:
        raise ConfigError([f"SOURCE {source} is relative: the job would look for it in its "
                           "temporary directory. Fix: give its absolute path on the cluster's "
                           "shared storage (e.g. /mnt/raytron/runs/tiny)."])
    arguments = ["serve", str(path.absolute()) if local else str(path),
                 *[item for item in options if item != "--detach"], "--detach"]
    return Submission(arguments, {}, path.name, SERVING_LINE)


def entrypoint(submission: Submission) -> str:
    """The job's shell command: each argument quoted, since a run name or a serving option
    is the user's text and `x;touch /tmp/p` must stay one argument, never a command."""
    return f"{ENTRYPOINT} {shlex.join(submission.arguments)}"


def shipped_package(into: Path) -> Path:
    """raytron's code, copied from where this process imports it, as one `raytron` folder:
    the job's `py_modules`, so that a cluster whose image lacks raytron runs this version."""
    import raytron.configs
    import raytron.model
    import raytron.pipelines
    import raytron.platform

    package = into / "raytron"
    for portion in (raytron.platform, raytron.model, raytron.pipelines, raytron.configs):
        shutil.copytree(next(iter(portion.__path__)), package / portion.__name__.split(".")[1],
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return package


def auth_headers() -> dict[str, str]:
    """The bearer token of a Ray cluster with token authentication, found where Ray itself
    looks ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), so that neither the
    token nor RAY_AUTH_MODE=token has to be exported by hand; none when auth is disabled."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and file.is_file():
        token = file.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    for name in ("ray.dashboard.modules.dashboard_sdk",  # "Uploading package ..."
                 "ray._private.runtime_env.packaging",  # "Creating a file package ..."
                 "ray.dashboard.modules.job.sdk"):  # "WebSocket closed": nothing to act on
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as error:  # unreachable, or refused: say what to do, no traceback
        raise ConfigError([f"cannot reach the Ray cluster's dashboard at {address}: "
                           f"{str(error).splitlines()[0]}. Fix: start one (`ray start --head`), "
                           "port-forward a KubeRay head (`kubectl port-forward "
                           "svc/raytron-head-svc 8265`), or give --address; with token "
                           "authentication, put the cluster's token in ~/.ray/auth_token or "
                           "$RAY_AUTH_TOKEN."]) from None


def submit(client, submission: Submission, address: str, follow: bool, wait_s: float,
           print_line: Callable[..., None] = print) -> int:
    """Submit the job, print where to see it, then stream its logs to the end (`follow`) or
    wait until it is under way; returns the exit status the job's command had."""
    job_id = f"raytron-{re.sub(r'[^A-Za-z0-9_-]', '-', submission.name)}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="raytron-submit-") as staging:
        staging_path = Path(staging)
        working_dir = staging_path / "job"
        working_dir.mkdir()
        for name, text in submission.files.items():
            (working_dir / name).write_text(text)
        runtime_env = {"working_dir": str(working_dir),
                       "py_modules": [str(shipped_package(staging_path / "code"))]}
        try:
            client.submit_job(entrypoint=entrypoint(submission),
                              submission_id=job_id, runtime_env=runtime_env,
                              metadata={"raytron": submission.name})
        except Exception as error:
            raise ConfigError([f"the cluster at {address} refused the job: "
                               f"{str(error).splitlines()[0]}"]) from None
    print_line(f"Submitted job {job_id} to {address}\n"
               f"  Ray dashboard: {address.rstrip('/')}/#/jobs/{job_id}\n"
               f"  logs:          ray job logs {job_id} --address {address} --follow\n"
               f"  stop:          ray job stop {job_id} --address {address}", flush=True)
    if follow:
        return follow_logs(client, job_id, print_line)
    return wait_until_under_way(client, job_id, submission, wait_s, print_line)


def follow_logs(client, job_id: str, print_line: Callable[..., None]) -> int:
    """The job's logs as they come, then its command's exit status. Ctrl-C leaves it running."""
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print_line(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        print_line(f"\nStopped following; the job goes on (`ray job stop {job_id}` stops it).")
        return 130
    return exit_status(client, job_id, print_line)


def wait_until_under_way(client, job_id: str, submission: Submission, wait_s: float,
                         print_line: Callable[..., None]) -> int:
    """Wait until the job prints the line that says it is under way (its MLflow run, or its
    endpoint), which is printed; when the job ends first, its last lines and status."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        done = has_ended(client, job_id)  # before the logs: an ended job's logs are whole
        logs = client.get_job_logs(job_id)
        found = submission.wait_for.search(logs)
        if found:
            print_line(f"  {submission.shown_as}{found.group()}")
            return 0
        if done:
            print_line("".join(logs.splitlines(True)[-20:]), end="")
            return exit_status(client, job_id, print_line)
        time.sleep(1.0)
    print_line(f"  The job is still starting after {wait_s:.0f} s; follow it with the logs "
               "command above.")
    return 0


def has_ended(client, job_id: str) -> bool:
    return str(client.get_job_status(job_id)).rsplit(".", 1)[-1] in ENDED


def exit_status(client, job_id: str, print_line: Callable[..., None]) -> int:
    """The exit status of the job's command (its driver), else 0 for success and 1 for
    failure, with the job's status said."""
    while not has_ended(client, job_id):
        time.sleep(0.5)
    info = client.get_job_info(job_id)
    status = str(info.status).rsplit(".", 1)[-1]
    print_line(f"Job {job_id} {status.lower()}"
               f"{f': {info.message}' if status != 'SUCCEEDED' and info.message else ''}")
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code)
    return 0 if status == "SUCCEEDED" else 1
