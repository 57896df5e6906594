"""What a person watching a run sees: a progress bar, one readable line per log step, and
nothing that would leak a credential or mean nothing to them."""

from __future__ import annotations

import math
from typing import Any, TextIO

from tqdm import tqdm

from raytron.platform.config.redact import redact_text
from raytron.platform.storage import metric_names as names

# Lines of Ray's own (C++ and library) logging, forwarded from its workers, that say
# nothing a raytron user can act on.
RAY_NOISE = ("has constructor arguments in the object store",  # actors of Ray Train/Data
             "Progress bars disabled. To enable")  # Ray Data, as raytron asks it to


class ConsoleStream:
    """The `raytron` command's stdout and stderr: credentials in URIs redacted, Ray's
    noise dropped (a dropped line's newline too, which `print` writes separately)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.dropped = False

    def write(self, text: str) -> int:
        if any(noise in text for noise in RAY_NOISE):
            self.dropped = True
            return len(text)
        if not (self.dropped and text == "\n"):
            self.stream.write(redact_text(text))
        self.dropped = False
        return len(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def format_step(step: int, total: int, m: dict[str, float]) -> str:
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}", f"loss {m[names.TRAIN_LOSS]:.4f}",
             f"lr {m['lr']:.2e}", f"grad {m['grad_norm']:.2f}",
             f"{m[names.TOKENS_PER_S] / 1e3:.1f}k tok/s",
             *([f"MFU {100 * m[names.MFU]:.1f}%"] if names.MFU in m else []),
             f"{1e3 * m[names.STEP_TIME_S]:.0f} ms/step",
             f"wait {1e3 * m[names.INPUT_WAIT_S]:.1f} ms",
             *([f"snapshot {1e3 * m[names.SNAPSHOT_S]:.0f} ms"] if names.SNAPSHOT_S in m else []),
             *([f"{m[names.REPLICAS]:.0f} replicas"] if names.REPLICAS in m else [])]
    if names.PEAK_MEMORY_GB in m:
        parts.append(f"peak mem {m[names.PEAK_MEMORY_GB]:.2f} GB")
    if "pipeline/idle" in m:
        parts.append(f"pipeline idle {100 * m['pipeline/idle']:.0f}%")
    if "rewards/accuracies" in m:
        parts.append(f"reward acc {m['rewards/accuracies']:.2f} "
                     f"margin {m['rewards/margins']:.3f}")
    skipped = sum(v for k, v in m.items() if k.startswith("data/skipped_"))
    if skipped:
        parts.append(f"skipped {skipped:.0f} records")
    return " | ".join(parts)


def format_validation(step: int, total: int, m: dict[str, float]) -> str:
    """The held-out loss with its perplexity, or under DPO with the share of held-out
    pairs whose chosen completion has the higher reward."""
    line = f"step {step:>{len(str(total))}}/{total} | val loss {m[names.VAL_LOSS]:.4f} | "
    if names.VAL_PERPLEXITY in m:
        return line + f"val perplexity {m[names.VAL_PERPLEXITY]:.2f}"
    return line + f"val reward accuracy {m.get('eval_rewards/accuracies', math.nan):.3f}"


def format_task_scores(step: int, total: int, m: dict[str, float]) -> str | None:
    """`step 50/300 | raytron_word_choice acc 0.3120 acc_norm 0.3010`, one part per task
    of train.eval_tasks; None when `m` holds no task score."""
    tasks: dict[str, list[str]] = {}
    for key, value in m.items():
        prefix, _, rest = key.partition("/")
        if prefix == names.EVAL_TASKS:
            task, _, metric = rest.rpartition("/")
            tasks.setdefault(task, []).append(f"{metric} {value:.4f}")
    if not tasks:
        return None
    return " | ".join([f"step {step:>{len(str(total))}}/{total}",
                       *(f"{task} {' '.join(parts)}" for task, parts in tasks.items())])


class Console:
    """The progress bar and the log lines of a training. The bar starts at the first step
    a worker group reports, and again after each relaunch, so that its rate and time left
    count training, not Ray starting a group."""

    def __init__(self, total: int | None, start: int):
        """`total`: the run's steps; None until they are counted (`train.steps=auto`)."""
        self.total = total or 0
        self.step = start  # the last step a worker group reported
        self.bar: tqdm | None = None

    def resize(self, total: int) -> None:
        self.total = total
        self.stop_bar()

    def write(self, text: str) -> None:
        """A line above the bar (or alone, before there is one)."""
        tqdm.write(text)

    def show(self, records: list[tuple[int, dict]]) -> None:
        for step, metrics in records:
            if "event" in metrics:  # a line a worker group asked to show (e.g. its resume)
                self.stop_bar()
                self.write(metrics["event"])
            if names.TRAIN_LOSS in metrics:
                self.step = max(self.step, step)
                self.write(format_step(step, self.total, metrics))
                if self.bar is None:
                    self.bar = tqdm(total=self.total or None, initial=step, unit="step",
                                    dynamic_ncols=True, desc="training",
                                    disable=None)  # no bar when output is no terminal
                if math.isfinite(metrics[names.TRAIN_LOSS]):
                    self.bar.set_postfix(loss=f"{metrics[names.TRAIN_LOSS]:.3f}")
            if names.VAL_LOSS in metrics:
                self.write(format_validation(step, self.total, metrics))
            if scores := format_task_scores(step, self.total, metrics):
                self.write(scores)
            if "checkpoint_step" in metrics:
                self.write(f"checkpoint committed at step {step}")
            if self.bar is not None and not self.bar.disable:
                self.bar.update(max(0, step - self.bar.n))

    def stop_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.stop_bar()
