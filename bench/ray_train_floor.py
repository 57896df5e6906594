"""How long Ray Train itself takes to start a worker group that does nothing: the floor
under the "group start" part of raytron's recovery (`bench/recovery.py`).

An empty `TorchTrainer` with the settings raytron uses (one CPU worker, a gloo process
group, no failure retries) is started several times on one local Ray; each time, the
seconds from `fit()` to the first line of the training function, and to `fit()`
returning. The first start also pays for Ray's worker processes; the later ones are what
a restart pays.

    python bench/ray_train_floor.py [--starts 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402


def entered(config: dict) -> None:
    Path(config["stamp"]).write_text(str(time.time()))  # one machine: a file says when


def one_start(storage: str, index: int) -> tuple[float, float]:
    """(seconds to the training function, seconds to fit() returning)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    stamp = Path(storage) / f"entered{index}"
    trainer = TorchTrainer(
        entered, train_loop_config={"stamp": str(stamp)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"floor{index}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=0)))
    started = time.time()
    trainer.fit()
    return float(stamp.read_text()) - started, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=4)
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        times = [one_start(storage, index) for index in range(args.starts)]
    ray.shutdown()
    rows = [[f"{index + 1}{' (first)' if index == 0 else ''}", f"{enter:.1f}", f"{total:.1f}"]
            for index, (enter, total) in enumerate(times)]
    later = times[1:] or times
    rows.append(["median of the later starts", f"{statistics.median(t[0] for t in later):.1f}",
                 f"{statistics.median(t[1] for t in later):.1f}"])
    table = markdown_table(["start", "fit() to the training function (s)",
                            "fit() to its return (s)"], rows)
    print(table)
    write_section("ray_train_floor", f"""
## Ray Train's own start-up (`bench/ray_train_floor.py`)

`python bench/ray_train_floor.py --starts {args.starts}` on {machine()}: an empty
`TorchTrainer` (one CPU worker, gloo, no retries), started {args.starts} times on one
local Ray. This is the floor under the "group start" column of the recovery table,
which covers the same span for raytron's worker group (Ray Train's controller, the
worker actor, the process group, then raytron's imports up to its first line).

{table}
""")


if __name__ == "__main__":
    main()
