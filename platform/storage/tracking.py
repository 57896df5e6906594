"""MLflow tracking: one MLflow run per training run, kept across restarts and resumes.

The controller opens (or reopens) the run and logs params and artifacts. Metrics (and
each worker node's system metrics, `worker/system_metrics.py`) go through a small
`Tracker` actor pinned to the controller's node: workers on any node can reach it, while
the default SQLite store is a file only the head node sees. The controller drains the
same records to draw its progress bar and log lines. Launches and resumes are events
(tags) and lines of the run's description, not charts: the run page opens on the loss
(`metric_names.py`). Every text that reaches MLflow has its credentials redacted
(`config/redact.py`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from raytron.platform.config.redact import MASK, redact_text
from raytron.platform.storage.metric_names import VAL_LOSS
from raytron.platform.storage.plots import log_plots

RUN_ID_FILE = "mlflow_run_id"
LAYOUT_TAG = "raytron.layout"  # the layout of the latest worker group
NOTE_TAG = "mlflow.note.content"  # the description, atop a run's Overview tab (Markdown)
NOTE_LIMIT = 5000  # characters of the description kept (MLflow keeps 8000 of a tag)
LINE_LIMIT = 1000  # ... of one of its lines
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"


def quiet_mlflow() -> None:
    """The SQLite store logs its schema migrations at INFO on first use; nobody needs them."""
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)


def tracking_uri(configured: str | None, runs_root: str | Path) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else one SQLite store for all local runs."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{Path(runs_root) / STORE_FILE}"
    )


def saved_tracking_uri(saved: str | None, run_dir: Path) -> str | None:
    """The tracking URI a run saved; $MLFLOW_TRACKING_URI where the saved one had
    credentials (redacted); None when neither can be used."""
    if saved and MASK in saved:
        return os.environ.get("MLFLOW_TRACKING_URI")
    return tracking_uri(saved, run_dir.resolve().parent)


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
# Experiments raytron creates are of MLflow's "model training" kind, and every link opens
# its training view: without them MLflow 3 opens its GenAI view, empty for a training run.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
TRAINING_VIEW = "workflowType=machine_learning"


def is_tracking_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The address of a run's page: on the tracking server itself (without the
    credentials of its URI, which a browser asks for), or on `mlflow ui` (default port)
    for a local store."""
    if is_tracking_server(uri):
        parts = urlsplit(uri)
        base = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
    else:
        base = LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def dashboard_command(uri: str) -> str | None:
    """The command that serves a local store's dashboard; None for a tracking server."""
    return None if is_tracking_server(uri) else f"mlflow ui --backend-store-uri {uri}"


def local_artifact_location(uri: str, runs_root: str | Path, experiment: str) -> str | None:
    """Artifacts of the default local store go beside it, not into ./mlruns of the cwd."""
    return str(Path(runs_root) / ARTIFACTS_DIR / experiment) if uri.startswith("sqlite:") \
        else None


class RunTracking:
    """The controller's side: the MLflow run of one training run."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None):
        quiet_mlflow()
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND_TAG]))
        else:  # one an older raytron created opens in MLflow's GenAI view without the tag
            self.experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG[0] not in found.tags:
                self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND_TAG)

    def open(self, run_dir: Path, run_name: str, params: dict, about: str) -> tuple[str, bool]:
        """The run id stored in `run_dir` (reopened), or a new run with `params`, described
        by `about` (Markdown); True when reopened. A reopened run keeps its params: MLflow's
        are immutable, and `record_resume` says what changed."""
        id_file = run_dir / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
            try:
                run = self.client.get_run(run_id)
            except Exception:  # deleted from this store, or another store: start afresh
                run = None
            if run is not None:
                self.client.update_run(run_id, status="RUNNING", name=run_name)
                return run_id, True
        tags = {**source_tags(), NOTE_TAG: redact_text(about)[:LINE_LIMIT]}
        run_id = self.client.create_run(self.experiment_id, run_name=run_name,
                                        tags=tags).info.run_id
        self.log_params(run_id, params)
        id_file.write_text(run_id)
        return run_id, False

    def record_resume(self, run_id: str, step: int, changes: list[str], about: str) -> None:
        """A resume from `step` as an event and a line of the run's description, with the
        config's changes since the run last started ("key: old -> new")."""
        text = redact_text(f"from step {step}, " + (f"changed {'; '.join(changes)}" if changes
                                                     else "nothing changed"))
        record_event(self.client, run_id, "resume", step, text)
        line = f"- {time.strftime('%Y-%m-%d %H:%M')} resumed {text}"[:LINE_LIMIT]
        note = self.client.get_run(run_id).data.tags.get(NOTE_TAG) or \
            redact_text(about)[:LINE_LIMIT]  # a run an older raytron started has none
        self.client.set_tag(run_id, NOTE_TAG, with_item(note, line))

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, redact_text(value))

    def record_failure(self, run_id: str, count: int, step: int, summary: str) -> None:
        """A failure of the worker group: the `restarts` metric and an event tag."""
        record_event(self.client, run_id, "failure", step, summary, count, metric="restarts")

    def record_event(self, run_id: str, kind: str, step: int, text: str) -> None:
        record_event(self.client, run_id, kind, step, text)

    def finish(self, run_id: str, status: str) -> None:
        """The final plots, then the run's end."""
        log_plots(self.client, run_id)
        self.client.set_terminated(run_id, status=status)


def with_item(note: str, item: str) -> str:
    """A description (its first paragraph, then a list) with one more list item (at most
    LINE_LIMIT long); the oldest items go, then the paragraph's end, when MLflow would not
    keep it all (it can be edited in MLflow's UI)."""
    head, _, items = note.partition("\n\n")
    kept = [*items.splitlines(), item]
    while len(kept) > 1 and len(head) + sum(len(line) + 1 for line in kept) + 1 > NOTE_LIMIT:
        kept.pop(0)
    return f"{head[:NOTE_LIMIT - len(item) - 2]}\n\n" + "\n".join(kept)


SIZE_NAMES = ("pp", "dp", "cp", "tp")  # what `Layout.sizes()` records, in its order


def sizes_text(sizes: dict) -> str:
    """"pp=1 dp=2 cp=2 tp=1" from `Layout.sizes()` or what a checkpoint recorded of it:
    only those names, and only whole numbers (a checkpoint's file is data)."""
    return " ".join(f"{name}={sizes[name]}" for name in SIZE_NAMES
                    if isinstance(sizes.get(name), int))


def layout_text(layout: dict[str, int]) -> str:
    """"pp=1 dp=2 tp=1 (2 workers)" (with cp=N before tp where it is given): the
    `raytron.layout` tag."""
    workers = layout["workers"]
    return f"{sizes_text(layout)} ({workers} worker{'s' if workers != 1 else ''})"


def launch_text(start: int, layout: dict[str, int], startup: dict[str, float]) -> str:
    """A launch event: the layout, the step the group started from and how long it took
    to get going, in parts (bench/recovery.py reads them back)."""
    return (f"{layout_text(layout)} from step {start}; up in {startup['total_s']:.1f} s: "
            f"Ray {startup['group_s']:.1f} s, build {startup['build_s']:.1f} s, "
            f"checkpoint {startup['load_s']:.1f} s, first step {startup['first_step_s']:.1f} s")


def source_tags() -> dict[str, str]:
    """Who started the run, with what, from which commit: MLflow's own tags (user, source
    name and type, as its fluent API sets them), the command and its config as the source
    (MLflow's run page shows a source's last path part: overrides with paths would hide
    it), the whole command line, and the git commit of the raytron code that runs, when
    it is a git checkout (an editable install)."""
    import subprocess
    import sys

    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags()
    words = [Path(word).name for word in sys.argv[1:] if "=" not in word][:2]
    tags["mlflow.source.name"] = " ".join(["raytron", *words])
    tags["raytron.command"] = redact_text(" ".join(["raytron", *sys.argv[1:]]))[:5000]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return tags
    if commit.returncode == 0:
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


class Tracker:
    """Ray actor: receives metric records from workers, writes them to MLflow, and keeps
    them for the controller's console until it drains them."""

    def __init__(self, uri: str, run_id: str):
        quiet_mlflow()
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.pending: list[tuple[int, dict]] = []
        self.step = 0  # the latest step a worker reported

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.write(step, metrics)
        self.step = step
        self.pending.append((step, metrics))
        if VAL_LOSS in metrics:  # a validation: the plots gain a point of each curve
            log_plots(self.client, self.run_id)

    def log_system(self, metrics: dict[str, float]) -> None:
        """A node's system metrics, at the latest training step: their charts line up
        with the loss's (`worker/system_metrics.py`)."""
        self.write(self.step, metrics)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def launched(self, start: int, layout: dict[str, int], startup: dict[str, float]) -> None:
        """A worker group finished its first step: its layout as the `raytron.layout` tag
        and a launch event with its start-up times (once per launch, not as charts)."""
        self.step = start
        self.client.set_tag(self.run_id, LAYOUT_TAG, layout_text(layout))
        record_event(self.client, self.run_id, "launch", start,
                     launch_text(start, layout, startup))

    def resumed(self, step: int, skipped: list[tuple[int, str]], from_memory: bool = False,
                fallback: str | None = None) -> None:
        """A worker group loaded the checkpoint of `step` (or its in-memory snapshot), after
        skipping those that did not load: the `raytron.resumed_from_step` tag, an event per
        skipped one, a console line."""
        self.client.set_tag(self.run_id, "raytron.resumed_from_step", str(step))
        falls = [fallback] if fallback else []
        falls += [f"checkpoint step {s} cannot be loaded ({why}); took the one before"
                  for s, why in skipped]
        for text in falls:
            record_event(self.client, self.run_id, "fallback", step,
                         f"{text}; resumed from step {step}")
        line = f"Resuming from step {step}" + (" (in-memory snapshot)" if from_memory else "") \
            + "".join(f"\n  {text}" for text in falls)
        self.pending.append((step, {"event": line}))

    def note(self, step: int, kind: str, text: str) -> None:
        """Something the run should know but that does not stop it: an event in MLflow
        and a line on the console."""
        record_event(self.client, self.run_id, kind, step, text)
        self.pending.append((step, {"event": text}))

    def drain(self) -> list[tuple[int, dict]]:
        records, self.pending = self.pending, []
        return records


def record_event(client, run_id: str, kind: str, step: int, text: str,
                 count: int | None = None, metric: str | None = None) -> None:
    """Tag `raytron.event.<kind>_<count>`: "<time> <kind> <count>: <text>". `count`
    defaults to the number of such events so far, and is logged as `metric` if given."""
    from mlflow.entities import Metric

    if count is None:
        tags = client.get_run(run_id).data.tags
        count = 1 + sum(key.startswith(f"raytron.event.{kind}_") for key in tags)
    if metric is not None:
        client.log_batch(run_id, metrics=[Metric(metric, count, int(time.time() * 1000), step)])
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    client.set_tag(run_id, f"raytron.event.{kind}_{count}",
                   f"{stamp} {kind} {count}: {redact_text(text)}"[:5000])
