"""What a failure costs: recovery time in parts, steps lost, and the checkpoint stall.

    python bench/recovery.py     # ~35 minutes on 2 cores; writes docs/benchmarks.md
    python bench/recovery.py --replicas     # the last comparison alone (~10 minutes)

For the tiny preset and a ~90M-parameter model (GPT-2 small's shape, a 4096-token
vocabulary), `raytron train` runs:

1. synchronous checkpoints, no in-memory snapshots (`checkpoint.memory_interval=0`), and
   the drill `kill rank 0 at step K` between two checkpoints: the time from the kill
   (the drill's marker) to the first completed step of the restarted worker group, in
   parts (detection, back-off, Ray starting the group, building model and optimizer,
   loading the checkpoint, the first step), read from the run's MLflow metrics and its
   launch events; and the steps lost (the baseline);
2. the same with an in-memory snapshot every step (`checkpoint.memory_interval=1`, the
   default): the restart loads the snapshot instead; and the median step time against
   run 1's, the snapshots' overhead;
3. without the drill, with `checkpoint.async_save=true`: the training stall of an async
   save, against the synchronous save of run 1; once copying the state itself, once
   written from the in-memory snapshot of the step.

Then two data-parallel replicas (two workers, one CPU each), killing rank 1 between two
checkpoints, in restart mode with snapshots (the baseline) and in replica mode
(`faults.mode=replicas`): the others' stall (kill to their next logged step), the time
until both replicas compute again, the steps computed again; and the median step time
of each mode with no failure.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from raytron.platform.storage import metric_names as names  # noqa: E402

SMALL_DATA = ["data.seq_len=128", "data.tokenizer_workers=1", "train.eval_interval=0",
              "train.log_interval=1", "cluster.cpus_per_worker=2", "faults.restart_backoff_s=1"]


@dataclass(frozen=True)
class Model:
    name: str
    preset: str
    overrides: tuple[str, ...]
    steps: int
    interval: int  # checkpoint.interval; the kill falls between two checkpoints
    halves: str  # the micro-batch that gives each of two replicas the same share

    @property
    def kill_step(self) -> int:
        return self.interval + self.interval // 2 + 1


MODELS = [
    Model("tiny (1M)", "tiny", ("train.global_batch=8", "train.micro_batch=8"), 16, 4,
          "train.micro_batch=4"),
    Model("~90M", "gpt2-124m", ("model.vocab_size=null", "data.vocab_size=4096",
                                "train.global_batch=4", "train.micro_batch=4",
                                "train.warmup_steps=1"), 6, 2, "train.micro_batch=2"),
]
PARTS = ["detection", "back-off", "group start", "build", "checkpoint load", "first step"]
# the start-up times of a launch event (`launch_text` in platform/storage/tracking.py)
LAUNCH = re.compile(r"up in [\d.]+ s: Ray (?P<group>[\d.]+) s, build (?P<build>[\d.]+) s, "
                    r"checkpoint (?P<load>[\d.]+) s, first step (?P<first>[\d.]+) s")


def train(root: Path, name: str, model: Model, extra: tuple[str, ...]):
    """Run `raytron train` to the end; its MLflow client, run id and checkpoint folder."""
    from mlflow import MlflowClient

    subprocess.run([sys.executable, "-m", "raytron.platform.cli", "train", model.preset,
                    f"run.root={root}", f"run.name={name}", f"train.steps={model.steps}",
                    f"checkpoint.interval={model.interval}", *SMALL_DATA, *model.overrides,
                    *extra], check=True, capture_output=True, cwd=root)
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client, (root / name / "mlflow_run_id").read_text().strip(), root / name / "checkpoints"


def history(client, run_id: str, key: str) -> list:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)


def last_launch(tags: dict[str, str]) -> dict[str, float]:
    """The start-up times, in parts, of the run's last launch event."""
    key = max((k for k in tags if k.startswith("raytron.event.launch_")),
              key=lambda k: int(k.rsplit("_", 1)[1]))
    return {part: float(value) for part, value in LAUNCH.search(tags[key]).groupdict().items()}


def recovery(root: Path, model: Model, memory_interval: int
             ) -> tuple[dict[str, float], int, float, float, float]:
    """Parts of the recovery (s), steps lost, mean sync save stall (s), checkpoint MB, and
    the median step time (s)."""
    client, run_id, checkpoints = train(root, f"sync{memory_interval}", model, (
        f"faults.inject=[kill rank 0 at step {model.kill_step}]",
        f"checkpoint.memory_interval={memory_interval}"))
    killed_at = (checkpoints / "faults" / "0").stat().st_mtime
    detected = history(client, run_id, "restarts")[0]
    first = next(m for m in history(client, run_id, names.TRAIN_LOSS)  # logged every step:
                 if m.timestamp > detected.timestamp)  # the restarted group's first one
    launch = last_launch(client.get_run(run_id).data.tags)
    parts = {"detection": detected.timestamp / 1e3 - killed_at, "back-off": 1.0,
             "group start": launch["group"], "build": launch["build"],
             "checkpoint load": launch["load"], "first step": launch["first"]}
    parts["total"] = first.timestamp / 1e3 - killed_at
    resumed = int(client.get_run(run_id).data.tags["raytron.resumed_from_step"])
    lost = (model.kill_step - 1) - resumed  # finished steps the restart does again
    stalls = [m.value for m in history(client, run_id, "checkpoint_save_s")]
    size = sum(f.stat().st_size for f in next(checkpoints.glob("step_*")).iterdir()) / 2**20
    step_time = statistics.median(m.value for m in history(client, run_id, names.STEP_TIME_S))
    return parts, lost, statistics.mean(stalls), size, step_time


def steady_step(root: Path, model: Model, memory_interval: int,
                extra: tuple[str, ...] = (), label: str = "") -> tuple[float, float]:
    """The median step time (s) of a run of 3x the model's steps with no failure and no
    checkpoint but the last, after its first 3 steps (the keepers' buffers are made in
    the first two); and the median time a snapshot held a step up (0 without)."""
    longer = dataclasses.replace(model, steps=3 * model.steps, interval=3 * model.steps)
    client, run_id, _ = train(root, f"steady{memory_interval}{label}", longer,
                              (f"checkpoint.memory_interval={memory_interval}", *extra))
    times = [m.value for m in history(client, run_id, names.STEP_TIME_S) if m.step > 3]
    stalls = [m.value for m in history(client, run_id, names.SNAPSHOT_S) if m.step > 3]
    return statistics.median(times), statistics.median(stalls) if stalls else 0.0


def two_replicas(model: Model, mode: str) -> tuple[str, ...]:
    return ("parallel.dp=2", "cluster.cpus_per_worker=1", model.halves, f"faults.mode={mode}")


def replica_drill(root: Path, model: Model, mode: str) -> tuple[float, float, int]:
    """Two replicas, rank 1 killed as step K starts: seconds from the kill until step K
    is logged, seconds until a step two replicas computed is, and the steps logged twice
    (finished steps a restart computed again)."""
    client, run_id, checkpoints = train(root, mode, model, (
        *two_replicas(model, mode), f"faults.inject=[kill rank 1 at step {model.kill_step}]"))
    killed_at = (checkpoints / "faults" / "0").stat().st_mtime * 1e3
    losses = history(client, run_id, names.TRAIN_LOSS)
    after = next(m for m in losses if m.timestamp > killed_at and m.step >= model.kill_step)
    both = next((m for m in history(client, run_id, names.REPLICAS)
                 if m.step >= model.kill_step and m.value == 2), after)
    return ((after.timestamp - killed_at) / 1e3, (both.timestamp - killed_at) / 1e3,
            len(losses) - len({m.step for m in losses}))


def async_stall(root: Path, model: Model, memory_interval: int) -> float:
    """The mean stall of an async save: copying the state itself (no snapshots), or
    written from the step's in-memory snapshot (one every step)."""
    client, run_id, _ = train(root, f"async{memory_interval}", model, (
        "checkpoint.async_save=true", f"checkpoint.memory_interval={memory_interval}"))
    return statistics.mean(m.value for m in history(client, run_id, "checkpoint_save_s"))


def main() -> None:
    recovery_rows, stall_rows, snapshot_rows = [], [], []
    for model in MODELS:
        with tempfile.TemporaryDirectory() as folder:
            parts, lost, sync, size, step_time = recovery(Path(folder), model, 0)
            memory, memory_lost, _, _, _ = recovery(Path(folder), model, 1)
            background = async_stall(Path(folder), model, 0)
            from_snapshot = async_stall(Path(folder), model, 1)
            plain, _ = steady_step(Path(folder), model, 0)
            snapshotted, stall = steady_step(Path(folder), model, 1)
        for source, times, steps in (("checkpoint", parts, lost),
                                     ("in-memory snapshot", memory, memory_lost)):
            recovery_rows.append([model.name, source, *(f"{times[p]:.1f}" for p in PARTS),
                                  f"**{times['total']:.1f}**", str(steps)])
        stall_rows.append([model.name, f"{size:,.0f}", f"{step_time:.2f}", f"{sync:.2f}",
                           f"{background:.2f}", f"{background / sync:.2f}",
                           f"{from_snapshot:.2f}", f"{from_snapshot / sync:.2f}"])
        snapshot_rows.append([model.name, f"{size:,.0f}", f"{plain:.3f}", f"{snapshotted:.3f}",
                              f"{stall:.3f}", f"{snapshotted / plain:.2f}"])
        print(recovery_rows[-2:], stall_rows[-1], snapshot_rows[-1], flush=True)
    tiny, big = MODELS
    body = f"""## Recovery (`bench/recovery.py`)

`python bench/recovery.py` on {machine()}; one CPU worker (2 threads), local Ray,
`faults.restart_backoff_s=1`. The drill `kill rank 0 at step K` SIGKILLs the worker
between two checkpoints (tiny: interval {tiny.interval}, K={tiny.kill_step}; ~90M:
interval {big.interval}, K={big.kill_step}). Seconds from the kill to the restarted
group's first completed step:

{markdown_table(["model", "restarts from", *PARTS, "total", "steps lost"], recovery_rows)}

Detection runs from the kill until the controller holds the failure: Ray noticing the
dead actor, Ray Train failing and tearing down the group. Group start is Ray Train
starting its controller and new worker processes (Python, torch) and the process group,
then raytron's imports up to the worker's first line: the largest part at this size,
whose floor is Ray Train's own start of an empty `TorchTrainer` (`bench/ray_train_floor.py`
below). Build is the mesh, the model (built on the meta device, then this rank's shards)
and the optimizer, whose first construction imports `torch._dynamo` (~0.5 s). The first
step includes the DataFeeder's seek to the checkpoint's cursor: it still holds the
batches made since that checkpoint and serves them again, so nothing is re-read or
re-tokenized. Steps lost are the finished
steps after the last commit, which the restarted group computes again (on average half
a `checkpoint.interval`; a preemption notice or a resize checkpoints first and loses
none); from an in-memory snapshot, none. Loading the snapshot took longer than reading
the checkpoint from the local disk at ~90M: the keeper's copy travels through Ray's
object store into memory the new worker has never touched, and on these machines memory
faulted in for the first time costs ~2-4 s per GB, more than the copy (a keeper's first
copy of the 1 GB share took 4.6 s in one process, a later one into the same buffers
0.2 s). Group start stays the largest part: a restart from a snapshot costs no step, but
still the seconds of starting a new worker group.

The snapshots' cost with no failure, in two more runs of {3 * tiny.steps} (tiny) and
{3 * big.steps} (~90M) steps with no checkpoint but the last: the median step time after
the third step with no snapshots (baseline) against a snapshot after every step, and
the median time a snapshot held training up (`Throughput/snapshot_s`: starting the
hand-over, and the next step's wait for it before its update; meanwhile a thread puts the
state into Ray's object store and the node's keeper copies it, while the next step
computes on the same 2 cores; on one node there is no next node to copy to):

{markdown_table(["model", "state MB", "step s, none", "step s, every step",
                 "snapshot s", "ratio"], snapshot_rows)}

Training stall per checkpoint, synchronous (baseline) against `checkpoint.async_save`,
which copies the state and writes it in the background; with in-memory snapshots on, it
writes the step's snapshot from Ray's object store instead, with no copy of its own:

{markdown_table(["model", "checkpoint MB", "step s", "sync stall s", "async stall s",
                 "async / sync", "async from the snapshot s", "ratio to sync"],
                stall_rows)}

Anchors: Ray Train restarts the whole worker group from the last reported checkpoint
too (`FailureConfig.max_failures`), so its recovery has the same parts; raytron adds
the watchdog for hangs and its own commit marker. CheckFreq (Mohan et al., FAST '21)
reports recovery in seconds to minutes instead of an epoch's work by checkpointing
every few iterations with a snapshot-then-persist pipeline, the same split as
`async_save` (copy the state, write it in the background, commit later).
"""
    print(body)
    write_section("recovery", body)


def replicas() -> None:
    """Restart mode against replica mode, two replicas of each model."""
    rows = []
    for model in MODELS:
        with tempfile.TemporaryDirectory() as folder:
            drills = {mode: replica_drill(Path(folder), model, mode) for mode in MODES}
            steady = {mode: steady_step(Path(folder), model, 1, two_replicas(model, mode),
                                        f"-{mode}")[0] for mode in MODES}
        for mode, (stall_s, both_s, again) in drills.items():
            rows.append([model.name, mode, f"{stall_s:.1f}", f"{both_s:.1f}", str(again),
                         f"{steady[mode]:.3f}", f"{steady[mode] / steady['restart']:.2f}"])
        print(rows[-2:], flush=True)
    tiny, big = MODELS
    body = f"""## Recovery with replicas (`bench/recovery.py --replicas`)

`python bench/recovery.py --replicas` on {machine()}: two data-parallel replicas (two
workers of one CPU each, an in-memory snapshot every step), rank 1 killed as step K
starts (tiny: K={tiny.kill_step}; ~90M: K={big.kill_step}). In restart mode (the baseline)
the whole group restarts from the snapshot; in replica mode (`faults.mode=replicas`)
rank 0 goes on alone with both halves of each batch, and Ray Train's replacement joins
from the snapshot keepers. "Others' stall" runs from the kill until step K is logged;
"both again", until a step both replicas computed is (`Throughput/replicas`; the run may
end first, then it is the same as the stall); steps computed again are the finished
steps logged twice. The step time is the median of a run of {3 * tiny.steps} (tiny) or
{3 * big.steps} (~90M) steps with no failure, after its third:

{markdown_table(["model", "faults.mode", "others' stall s", "both again s",
                 "steps computed again", "step s, no failure", "ratio"], rows)}

Replica mode's stall is the quorum noticing the lost heartbeat (1.5 s) and then the step
computed by one replica with both halves of the batch; a restart is a whole new worker
group. Neither computes a finished step again (both start from the last one's
snapshot). The step time with no failure was lower in replica mode on these runs:
restart mode's dp=2 shards weights and optimizer state (FSDP, `parallel.dp_shard=full`
by default) and gathers them in every layer, while each replica holds the whole model
and its optimizer state and sums its gradients once per step: more memory per device
for fewer, larger exchanges.
"""
    print(body)
    write_section("recovery-replicas", body)


MODES = ("restart", "replicas")

if __name__ == "__main__":
    if "--replicas" not in sys.argv[1:]:
        main()
    replicas()
