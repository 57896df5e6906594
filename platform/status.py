"""`raytron status RUN_DIR`: where a run stands, from its directory, checkpoints and MLflow."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from raytron.platform.checkpoint import CheckpointStore
from raytron.platform.config import ConfigError
from raytron.platform.controller import CONFIG_FILE
from raytron.platform.tracking import RUN_ID_FILE, tracking_uri


def describe_run(run_dir: str) -> str:
    folder = Path(run_dir)
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError([f"{run_dir} holds no raytron run (no {CONFIG_FILE}). Fix: give the "
                           "run directory, <run.root>/<run.name>, e.g. runs/tiny."])
    config = OmegaConf.load(folder / CONFIG_FILE)
    store = CheckpointStore(config.checkpoint.dir, config.checkpoint.keep_last)
    steps = store.committed_steps()
    p = config.parallel
    lines = [f"run          {config.run.name} ({folder.resolve()})",
             f"layout       pp={p.pp} dp={p.dp} tp={p.tp} on {config.cluster.workers} "
             f"worker(s), schedule {p.schedule}"]
    if steps:
        meta = store.meta(steps[-1])
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("time", 0)))
        layout = meta.get("layout", {})
        lines.append(f"checkpoint   step {steps[-1]} of {config.train.steps}, saved {saved} by "
                     f"pp={layout.get('pp')} dp={layout.get('dp')} tp={layout.get('tp')}; "
                     f"committed: {', '.join(map(str, steps))} in {config.checkpoint.dir}")
    else:
        lines.append(f"checkpoint   none committed yet in {config.checkpoint.dir}")
    lines += mlflow_lines(folder, tracking_uri(config.tracking.uri, folder.resolve().parent))
    return "\n".join(lines)


def mlflow_lines(folder: Path, uri: str) -> list[str]:
    id_file = folder / RUN_ID_FILE
    if not id_file.is_file():
        return ["mlflow       no run recorded"]
    from mlflow import MlflowClient

    from raytron.platform.tracking import quiet_mlflow

    quiet_mlflow()
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    run_id = id_file.read_text().strip()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return [f"mlflow       run {run_id} not found in {uri}"]
    metrics, tags = run.data.metrics, run.data.tags
    lines = [f"state        {run.info.status} (MLflow run {run.info.run_id} in {uri})"]
    if "layout/dp" in metrics:
        lines.append("last layout  " + " ".join(
            f"{dim}={int(metrics[f'layout/{dim}'])}" for dim in ("pp", "dp", "tp")))
    if "loss" in metrics:
        history = client.get_metric_history(run.info.run_id, "loss")
        last = max(history, key=lambda m: (m.step, m.timestamp))
        val = f"; val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        lines.append(f"progress     step {last.step}, loss {last.value:.4f}{val}")
    lines.append(f"restarts     {int(metrics.get('restarts', 0))}")
    events = sorted(v for k, v in tags.items() if k.startswith("raytron.event."))
    if events:
        lines.append("events")
        lines += [f"  {event}" for event in events]  # each starts with its time
    return lines
