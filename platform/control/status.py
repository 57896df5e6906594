"""`raytron status RUN_DIR`: where a run stands, from its directory, checkpoints and MLflow."""

from __future__ import annotations

import time
from pathlib import Path

from raytron.platform.config.redact import MASK
from raytron.platform.storage import metric_names as names
from raytron.platform.storage.checkpoint import CheckpointStore
from raytron.platform.storage.lease import run_folders, writer_line
from raytron.platform.storage.run_dir import RunPaths, read_run_config
from raytron.platform.storage.tracking import (
    LAYOUT_TAG,
    RUN_ID_FILE,
    dashboard_command,
    quiet_mlflow,
    run_url,
    saved_tracking_uri,
    sizes_text,
)


def describe_run(run_dir: str) -> str:
    folder = Path(run_dir)
    config = read_run_config(folder)
    p = config.parallel
    lines = [f"run          {config.run.name} ({folder.resolve()})",
             f"layout       pp={p.pp} dp={p.dp}{f' cp={p.cp}' if p.cp > 1 else ''} tp={p.tp} "
             f"on {config.cluster.workers} "
             f"worker(s), schedule {p.schedule}"]
    lines.append(checkpoint_line(config.checkpoint.dir, config.checkpoint.keep_last,
                                 config.train.steps))
    if MASK not in config.checkpoint.dir:
        paths = RunPaths(folder.resolve().parent, folder.resolve(), config.checkpoint.dir)
        lines.append(writer_line(run_folders(paths)))
    lines += mlflow_lines(folder, saved_tracking_uri(config.tracking.uri, folder))
    return "\n".join(lines)


def checkpoint_line(directory: str, keep_last: int, steps: int) -> str:
    if MASK in directory:
        return (f"checkpoint   {directory} holds credentials, which raytron does not save: "
                "run the training command to resume from it")
    store = CheckpointStore(directory, keep_last)
    committed = store.committed_steps()
    if not committed:
        return f"checkpoint   none committed yet in {directory}"
    meta = store.meta(committed[-1])
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("time", 0)))
    layout = meta.get("layout", {})
    return (f"checkpoint   step {committed[-1]} of {steps}, saved {saved} by "
            f"{sizes_text(layout)}; "
            f"committed: {', '.join(map(str, committed))} in {directory}")


def mlflow_lines(folder: Path, uri: str | None) -> list[str]:
    id_file = folder / RUN_ID_FILE
    if not id_file.is_file():
        return ["mlflow       no run recorded"]
    if uri is None:
        return ["mlflow       tracking.uri holds credentials, which raytron does not save: "
                "set MLFLOW_TRACKING_URI to read the run's MLflow record"]
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    quiet_mlflow()
    client = MlflowClient(tracking_uri=uri)
    run_id = id_file.read_text().strip()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return [f"mlflow       run {run_id} not found in {uri}"]
    metrics, tags = run.data.metrics, run.data.tags
    lines = [f"state        {run.info.status} (MLflow run {run.info.run_id} in {uri})"]
    if LAYOUT_TAG in tags:
        lines.append(f"last layout  {tags[LAYOUT_TAG]}")
    if names.TRAIN_LOSS in metrics:
        history = client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)
        last = max(history, key=lambda m: (m.step, m.timestamp))
        val = f"; val loss {metrics[names.VAL_LOSS]:.4f}" if names.VAL_LOSS in metrics else ""
        lines.append(f"progress     step {last.step}, loss {last.value:.4f}{val}")
    lines.append(f"restarts     {int(metrics.get('restarts', 0))}")
    events = sorted(v for k, v in tags.items() if k.startswith("raytron.event."))
    if events:
        lines.append("events")
        lines += [f"  {event}" for event in events]  # each starts with its time
    lines.append(f"run page     {run_url(uri, run.info.experiment_id, run.info.run_id)}")
    command = dashboard_command(uri)
    if command:
        lines.append(f"dashboard    {command}")
    return lines
