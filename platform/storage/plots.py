"""Pictures of a run, logged to its MLflow run as artifacts (plots/loss.png and
plots/throughput.png): what an ML engineer looks at first, in one image each, drawn
from the metric histories MLflow already holds, at each validation and at the end."""

from __future__ import annotations

import tempfile
from pathlib import Path

from raytron.platform.storage import metric_names as names

PLOTS_DIR = "plots"
# file name -> (title, [(metric, label)], y-axis label, second y axis: (metric, label) | None)
PLOTS = {
    "loss.png": ("Loss", [(names.TRAIN_LOSS, "training"), (names.VAL_LOSS, "validation")],
                 "loss (nats/token)", None),
    "throughput.png": ("Throughput", [(names.TOKENS_PER_S, "tokens/s")], "tokens/s",
                       (names.MFU, "MFU")),
}


def draw(histories: dict[str, list[tuple[int, float]]], name: str, folder: Path) -> Path | None:
    """One plot of `PLOTS` from (step, value) histories; None when it has nothing to show."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a head node
    import matplotlib.pyplot as plt

    title, series, ylabel, twin = PLOTS[name]
    if not any(histories.get(metric) for metric, _ in series):
        return None
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for metric, label in series:
        points = histories.get(metric) or []
        if points:
            axis.plot(*zip(*points, strict=True), label=label,
                      marker="o" if len(points) < 30 else None)
    axis.set(title=title, xlabel="step", ylabel=ylabel)
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    if twin and histories.get(twin[0]):
        other = axis.twinx()
        other.plot(*zip(*histories[twin[0]], strict=True), color="tab:orange", label=twin[1])
        other.set_ylabel(twin[1])
        more = other.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axis.legend(handles, labels, loc="best")
    path = folder / name
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def log_plots(client, run_id: str) -> list[str]:
    """Draw every plot from the run's metric histories and log it (replacing the last);
    returns the artifact paths logged."""
    metrics = {metric for _, series, _, twin in PLOTS.values()
               for metric, _ in series + ([twin] if twin else [])}
    histories = {metric: sorted((m.step, m.value) for m in client.get_metric_history(run_id,
                                                                                    metric))
                 for metric in metrics}
    logged = []
    with tempfile.TemporaryDirectory() as folder:
        for name in PLOTS:
            path = draw(histories, name, Path(folder))
            if path is not None:
                client.log_artifact(run_id, str(path), PLOTS_DIR)
                logged.append(f"{PLOTS_DIR}/{name}")
    return logged
