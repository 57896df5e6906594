"""`raytron runs`: the runs of an MLflow store in one table, newest first, so that
comparing runs needs no dashboard."""

from __future__ import annotations

import re
import time

from raytron.platform.storage import metric_names as names
from raytron.platform.storage.tracking import LAYOUT_TAG, quiet_mlflow

COLUMNS = ("name", "state", "step", "loss", "val ppl", "layout", "restarts", "started")


def run_rows(uri: str, experiment: str, limit: int) -> list[tuple[str, ...]]:
    """One row of `COLUMNS` per run of `experiment`, newest first; none when it is absent."""
    from mlflow import MlflowClient

    quiet_mlflow()
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    rows = []
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=limit):
        metrics = run.data.metrics
        history = client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)
        step = str(max(m.step for m in history)) if history else "-"
        # "pp=1 dp=4 tp=1 (4 workers)" -> "1x4x1"
        layout = "x".join(re.findall(r"\b[pdct]p=(\d+)", run.data.tags.get(LAYOUT_TAG, "")))
        rows.append((run.info.run_name, run.info.status, step,
                     f"{metrics[names.TRAIN_LOSS]:.4f}" if names.TRAIN_LOSS in metrics else "-",
                     f"{metrics[names.VAL_PERPLEXITY]:.2f}" if names.VAL_PERPLEXITY in metrics
                     else "-",
                     layout or "-", str(int(metrics.get("restarts", 0))),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))))
    return rows


def runs_table(uri: str, experiment: str, limit: int) -> str:
    rows = run_rows(uri, experiment, limit)
    if not rows:
        return f"no runs in experiment '{experiment}' of {uri}"
    widths = [max(len(str(cell)) for cell in column) for column in zip(COLUMNS, *rows, strict=True)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                     .rstrip() for row in (COLUMNS, *rows))
