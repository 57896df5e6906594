"""How long `raytron train` takes to its first step, against Ray Train's own start of an
empty worker group measured in the same run.

    python bench/startup.py [--runs 2]

Each run is a fresh `raytron train tiny` of 24 steps in a new folder (the shape the e2e
tests train: 2 layers, sequences of 64, a global batch of 8, one CPU worker, no
dashboard), timed from the command's start to its line "Starting run" (imports, the
config, the tokenizer, the MLflow run), to "step 1/24" (Ray, the run's actors, Ray
Train's worker group, the model, the first batch) and to its exit. The baseline is
the floor under the middle span: on a fresh local Ray (`ray.init` timed), an empty
`TorchTrainer` with raytron's settings, from `fit()` to its training function
(`bench/ray_train_floor.py`).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ray_train_floor import one_start  # noqa: E402
from report import machine, markdown_table, write_section  # noqa: E402

RUN = ["model.n_layers=2", "data.seq_len=64", "train.global_batch=8", "train.micro_batch=4",
       "train.steps=24", "train.warmup_steps=4", "train.log_interval=1",
       "train.eval_interval=12", "checkpoint.interval=6", "cluster.cpus_per_worker=1",
       "cluster.dashboard=false"]


def one_run(folder: Path) -> dict[str, float]:
    """Seconds from the command's start to each of its milestones, and step 1's wait for
    its batch (ms, from the step line)."""
    started = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "raytron.platform.cli", "train", "tiny", f"run.root={folder}",
         "run.name=startup", *RUN], cwd=folder, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    times: dict[str, float] = {}
    for line in process.stdout:
        if line.startswith("Starting run"):
            times["starting"] = time.time() - started
        elif line.startswith("step  1/24") and "loss" in line:
            times["step1"] = time.time() - started
            times["wait_ms"] = float(re.search(r"wait ([\d.]+) ms", line).group(1))
    if process.wait() != 0 or len(times) != 3:
        raise SystemExit(f"raytron train failed (exit {process.returncode})")
    times["total"] = time.time() - started
    return times


def floor() -> tuple[float, float]:
    """(ray.init seconds, fit() to the empty training function) on a fresh local Ray."""
    import ray

    started = time.time()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init = time.time() - started
    with tempfile.TemporaryDirectory() as storage:
        enter, _ = one_start(storage, 0)
    ray.shutdown()
    return init, enter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as folder:
            runs.append(one_run(Path(folder)))
    init, enter = floor()
    rows = [[f"raytron train, run {index + 1}", f"{r['starting']:.1f}",
             f"{r['step1'] - r['starting']:.1f}", f"{r['wait_ms']:.0f}", f"{r['total']:.1f}",
             f"{(r['step1'] - r['starting']) / (init + enter):.2f}"]
            for index, r in enumerate(runs)]
    middle = statistics.median(r["step1"] - r["starting"] for r in runs)
    rows.append(["raytron train, median", "", f"{middle:.1f}", "", "",
                 f"{middle / (init + enter):.2f}"])
    rows.append(["Ray Train's floor: ray.init + an empty group", "", f"{init + enter:.1f} "
                 f"({init:.1f} + {enter:.1f})", "", "", "1.00"])
    table = markdown_table(["start", "to \"Starting run\" (s)", "then to step 1 (s)",
                            "step 1 waited for data (ms)", "to exit (s)", "step-1 span / floor"],
                           rows)
    print(table)
    write_section("startup", f"""
## A run's start (`bench/startup.py`)

`python bench/startup.py --runs {args.runs}` on {machine()}: a fresh `raytron train tiny`
of 24 steps (2 layers, sequences of 64, global batch 8, one CPU worker, no dashboard),
timed from the command's start to "Starting run", from there to the first step's line,
and to its exit; the baseline is the floor under the middle span, measured in the same
run: `ray.init` of a fresh local Ray, then an empty `TorchTrainer` with raytron's settings
from `fit()` to its training function. Above the floor are the run's actors, raytron's
imports in the worker, the model and optimizer, and the first batch (which the DataFeeder
reads ahead while the workers start).

{table}
""")


if __name__ == "__main__":
    main()
