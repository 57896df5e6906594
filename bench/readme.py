"""The figures the README quotes, measured by running its commands as a new user would.

    python bench/readme.py     # ~10 minutes on 2 cores; writes docs/benchmarks.md

In a scratch folder, as the README writes them: `raytron train` (the tiny preset), its
held-out evaluation, the fine-tuning of `configs/sft-tiny.yaml` and its one-epoch variant
(`train.steps=auto`), and the exact answers of the models before and after fine-tuning
(100 reverse-words chats held out of it). Every figure the README gives for these
commands comes from this table; rerun it when they change.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from raytron.pipelines.embedded import REVERSE_WORDS, REVERSE_WORDS_PAIRS  # noqa: E402
from raytron.platform.models.answers import (  # noqa: E402
    exact_answers,
    held_out_samples,
    preferred_pairs,
)

STEP_LINE = re.compile(r"^step +(\d+)/(\d+) \| loss ([\d.]+) .*?\| ([\d.]+)k tok/s", re.M)


def raytron(folder: Path, *argv: str) -> tuple[str, float]:
    """`raytron ARGV` in `folder`: its output and seconds, or the failure."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "raytron.platform.cli", *argv], cwd=folder,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"raytron {' '.join(argv)} failed:\n{result.stdout[-3000:]}"
                         f"{result.stderr[-3000:]}")
    return result.stdout + result.stderr, time.perf_counter() - started


def training(output: str) -> dict[str, str]:
    """First and last logged loss, the range of tokens/s after the first step, a line."""
    steps = [(int(s), float(loss), float(rate)) for s, _, loss, rate
             in STEP_LINE.findall(output)]
    rates = [rate for step, _, rate in steps if step > 1]
    middle = next(line for line in output.splitlines()
                  if line.startswith(f"step {steps[len(steps) // 2][0]}/"))
    return {"first loss": f"{steps[0][1]:.4f}", "last loss": f"{steps[-1][1]:.4f}",
            "tokens/s": f"{min(rates):.1f}k-{max(rates):.1f}k (median "
                        f"{statistics.median(rates):.1f}k)",
            "a log line": "`" + middle.replace("|", "\\|") + "`"}


def main() -> None:
    rows: list[list[str]] = []
    chats = held_out_samples(REVERSE_WORDS, 0.05, 100)
    with tempfile.TemporaryDirectory(prefix="raytron-readme-") as scratch:
        folder = Path(scratch)
        command = "raytron train"
        output, seconds = raytron(folder, "train")
        rows.append([command, "wall time", f"{seconds:.0f} s"])
        rows += [[command, name, value] for name, value in training(output).items()]
        command = "raytron eval runs/tiny --data embedded:python-reference --split held-out"
        output, _ = raytron(folder, *command.split()[1:])
        loss = re.search(r"loss ([\d.]+)", output)
        rows.append([command, "held-out loss", loss.group(1) if loss else output[-200:]])
        rows.append(["(runs/tiny, before fine-tuning)", "exact answers of 100 chats",
                     str(exact_answers(folder / "runs" / "tiny", chats))])
        command = "raytron train configs/sft-tiny.yaml"
        output, seconds = raytron(folder, "train", "configs/sft-tiny.yaml")
        rows.append([command, "wall time", f"{seconds:.0f} s"])
        rows.append([command, "last loss", training(output)["last loss"]])
        rows.append([command, "exact answers of 100 chats",
                     str(exact_answers(folder / "runs" / "sft-tiny", chats))])
        command = "raytron train configs/sft-tiny.yaml run.name=sft-epoch train.steps=auto"
        output, seconds = raytron(folder, *command.split()[1:])
        counted = re.search(r"train\.steps=auto: the data gives (\d+) steps of (\d+)", output)
        rows.append([command, "steps counted", f"{counted.group(1)} steps of "
                                               f"{counted.group(2)} sequences"])
        rows.append([command, "wall time", f"{seconds:.0f} s"])
        rows.append([command, "exact answers of 100 chats",
                     str(exact_answers(folder / "runs" / "sft-epoch", chats))])
        pairs = held_out_samples(REVERSE_WORDS_PAIRS, 0.05, 100)
        rows.append(["(runs/tiny, before DPO)", "held-out pairs of 100 preferred",
                     str(preferred_pairs(folder / "runs" / "tiny", pairs))])
        command = "raytron train configs/dpo-lora-tiny.yaml"
        output, seconds = raytron(folder, "train", "configs/dpo-lora-tiny.yaml")
        rows.append([command, "wall time", f"{seconds:.0f} s"])
        rows.append([command, "held-out pairs of 100 preferred",
                     str(preferred_pairs(folder / "runs" / "dpo-lora-tiny", pairs))])
        command = "raytron train configs/dpo-tiny.yaml"
        output, seconds = raytron(folder, "train", "configs/dpo-tiny.yaml")
        rows.append([command, "wall time", f"{seconds:.0f} s"])
        reference = re.search(r"computed in (\d+) s before the first step", output)
        rows.append([command, "reference pass", f"{reference.group(1)} s" if reference
                     else output[-200:]])
        rows.append([command, "held-out pairs of 100 preferred",
                     str(preferred_pairs(folder / "runs" / "dpo-tiny", pairs))])
        runs, _ = raytron(folder, "runs")
    table = markdown_table(["command", "figure", "measured"], rows)
    print(f"{table}\n\n{runs}")
    write_section("readme", f"""## The README's figures

`python bench/readme.py` ({machine()}): the README's commands, run in a scratch folder
as a new user would; the README quotes these figures.

{table}

`raytron runs` after them:

```
{runs.rstrip()}
```""")


if __name__ == "__main__":
    main()
