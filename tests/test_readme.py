"""The README's commands run as written, in order, in a scratch folder holding the files
they name (a corpus/ folder, more.jsonl, my-run.yaml, ~/data/...), with tiny step
counts where a training would take minutes. Those that need what a test machine lacks
(a GPU, a second node, a server left running) are named in `NOT_RUN` with the test that
covers them instead, and still parse; a command that is in neither fails the test, so
the README cannot show one that nobody checks. The output the README quotes from
`raytron plan` is compared line by line."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from raytron.platform.cli import build_parser

from conftest import REPO

README = REPO / "README.md"
# appended to every `raytron train`: a few steps of a small batch (the README's values
# apply up to the step count; a later key=value wins)
FEW_STEPS = ("train.steps=2", "checkpoint.interval=2", "train.eval_interval=0",
             "train.log_interval=1")
# appended to a `raytron eval --tasks` without a --limit: each task's first items (the
# README's three whole take half a minute; tests/test_task_scoring.py scores one whole)
FEW_ITEMS = ("--limit", "20")
# ... and to the GPU presets, whose steps take minutes on a CPU
SMALL_BATCH = ("train.global_batch=4", "train.micro_batch=1", "data.seq_len=64")
# commands that need a GPU, other nodes or a server left running: checked elsewhere, and
# parsed here (raytron's) or left to their own tools
NOT_RUN = {
    "pip install": "the README's set-up: the environment these tests run in",
    "raytron serve": "a server until Ctrl-C: tests/test_serve.py, with the openai client",
    "curl": "asks a running server: tests/test_serve.py",
    "serve run": "Ray Serve's own command: tests/test_serve.py deploys the same application",
    "ray start": "a cluster: tests/test_submit.py starts one",
    "ray stop": "a cluster: tests/test_submit.py",
    "raytron submit": "a job on a cluster: tests/test_submit.py",
    "ray job submit": "a job on a cluster: tests/test_submit.py",
    "RAY_AUTH_MODE=token ray job submit": "a job on a cluster: tests/test_submit.py",
    "mlflow ui": "a server until Ctrl-C: its store is what tests/test_tracking.py reads",
    "python -m pytest": "the tests themselves",
    "ruff check": "the linter, run by the hook before a commit",
    "python bench/": "benchmarks, minutes each (docs/benchmarks.md)",
    "from openai import OpenAI": "asks a running server: tests/test_serve.py",
    "lm-eval run": "asks a running server: tests/test_task_eval.py runs lm_eval's "
                   "local-completions on raytron serve",
    "raytron eval runs/tiny --tasks hellaswag": "hellaswag's data is on the Hugging Face "
                                                "Hub: tests/test_task_eval.py scores tasks "
                                                "from local files",
    "raytron eval runs/tiny --tasks mtnlg": "the datasets are downloads: "
                                            "tests/test_mtnlg_tasks.py scores the set from "
                                            "files in their releases' formats",
    "hf download": "a download from the Hub: tests/test_families.py writes a Hugging Face "
                   "cache and reads a model from it by its id",
    "raytron generate Qwen/": "a released model (a download): tests/test_families.py "
                              "generates from a cached Hub id, and from each family as "
                              "transformers does",
    "raytron eval Qwen/": "a released model and the MT-NLG data (downloads): "
                          "tests/test_families.py scores each family's perplexity as "
                          "transformers does",
    "raytron train qwen3-0.6b": "a released model: tests/test_families.py trains each "
                                "family from its weights in every layout",
    "raytron train sft-qwen3-0.6b": "a released model: tests/test_train_e2e.py fine-tunes an "
                                    "imported Mistral in its own template",
    "raytron export runs/sft-qwen3-0.6b": "a released model: tests/test_families.py exports "
                                          "each family back bit for bit",
}
# trainings whose configs are checked (`raytron config`) but not run here: more devices
# than a test machine has, or what other tests train already (a training costs 25-60 s)
CONFIG_ONLY = {
    "cluster.workers=8": "8 GPUs, or several nodes",
    "parallel.": "layouts: tests/test_parallel.py trains each against one process, "
                 "tests/test_train_e2e.py dp2 with failures and dp=auto x tp2 resizing",
    "run.name=longer": "the README's first training, longer",
    "train my-run.yaml  ": "the README's first training with its keys in a YAML file, as "
                           "the shipped configs/*.yaml that tests/test_adapt_e2e.py trains",
    "run.name=books": "folders and JSONL files: the mix below reads both",
    "run.name=plays": "paragraph documents of a folder: the mix below reads them",
    "train.eval_tasks": "tests/test_train_e2e.py trains a run that scores a task at steps "
                        "12 and 24",
    "run.name=mix": "weighted sources: tests/test_feeder.py mixes folders and JSONL files",
    "data.tokenizer=tokenizer.json": "a trained tokenizer: tests/test_config.py trains one, "
                                     "tests/test_task_scoring.py trains a run on one",
    "run.name=sft-epoch": "sft-tiny with train.steps=auto: tests/test_train_e2e.py "
                          "fine-tunes for one epoch (python -m pytest -m learning)",
    "run.name=tiny-continued": "tests/test_train_e2e.py fine-tunes from an export; "
                               "tests/test_parallel.py starts every layout from one",
    "configs/sft-tiny.yaml  #": "tests/test_train_e2e.py fine-tunes with it",
    "configs/dpo-tiny.yaml": "tests/test_adapt_e2e.py trains it, killed once",
}


@dataclass(frozen=True)
class Command:
    text: str  # as the README writes it
    argv: list[str]
    language: str  # bash or python


def readme_commands() -> list[Command]:
    """Every command of the README's bash and python blocks, in order; a bash command
    continued with a backslash or an open quote is one command."""
    commands = []
    for language, body in re.findall(r"```(bash|python)\n(.*?)```", README.read_text(), re.S):
        if language == "python":
            commands.append(Command(body, [sys.executable, "-c", body], language))
            continue
        pending = ""
        for line in body.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            if pending.rstrip().endswith("\\"):
                pending = pending.rstrip()[:-1]
                continue
            try:
                argv = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if argv and argv[-1] == "&":  # run in the background: the command is the rest
                argv = argv[:-1]
            if argv:
                commands.append(Command(pending.strip(), argv, language))
            pending = ""
    return commands


def not_run(command: Command) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.text.startswith(start)),
                None)


def scratch(folder: Path, home: Path) -> None:
    """The files the README's commands name, made of the Python reference's text."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)][:60]
    for name in ("corpus", "notes"):
        (folder / name).mkdir()
        for index, text in enumerate(texts[:20]):
            (folder / name / f"{index}.txt").write_text(text)
    (folder / "more.jsonl").write_text("\n".join(json.dumps({"text": t, "body": t})
                                                 for t in texts[20:40]))
    (folder / "my-run.yaml").write_text("run:\n  name: my-run\ndata:\n  sources: [corpus/]\n")
    data = home / "data"
    (data / "shakespeare").mkdir(parents=True)
    for index, text in enumerate(texts[40:50]):
        (data / "shakespeare" / f"{index}.txt").write_text(text)
    (data / "fortunes.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[50:]))


def argv_to_run(command: Command, trained: set[str]) -> list[str]:
    """The command's arguments as run here: raytron and python from this environment; a
    task evaluation of a few items; a training with a few steps, under a run name of its
    own unless it names one (so that each trains, instead of finding runs/tiny finished),
    but the README's first `raytron train`, which makes runs/tiny for the commands after
    it, and the shipped configs, which name their runs."""
    argv = list(command.argv)
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[0] != "raytron":
        return argv
    argv = [sys.executable, "-m", "raytron.platform.cli", *argv[1:]]
    if command.argv[1:2] == ["eval"] and "--tasks" in argv and "--limit" not in argv:
        return [*argv, *FEW_ITEMS]
    if command.argv[1:2] != ["train"]:
        return argv
    if any(text in command.text for text in CONFIG_ONLY):
        return [*argv[:3], "config", *argv[4:]]
    extra = list(FEW_STEPS)
    if trained:  # the first training starts Ray's dashboard as a user's does; the rest
        extra.append("cluster.dashboard=false")  # need not pay its ~8 s again
    if any(preset in command.argv for preset in ("gpt2-124m", "llama-1b")):
        extra += SMALL_BATCH
    shipped = any(a.startswith("configs/") for a in command.argv)  # its run is named in it,
    # and later commands use that name (runs/sft-lora-tiny)
    if command.argv != ["raytron", "train"] and not shipped \
            and not any("run.name=" in a for a in argv):
        extra.append(f"run.name=readme-{len(trained)}")
    trained.add(command.text)
    return [*argv, *extra]


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> list[tuple[Command, subprocess.CompletedProcess | None]]:
    """Each README command and what running it gave (None: not run, see NOT_RUN), run as
    on a laptop: each training starts a local Ray of its own; HOME is a scratch folder."""
    folder, home = tmp_path_factory.mktemp("readme"), tmp_path_factory.mktemp("home")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env |= {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
            "RAY_USAGE_STATS_ENABLED": "0"}
    scratch(folder, home)
    results = []
    trained: set[str] = set()
    for command in readme_commands():
        if not_run(command):
            results.append((command, None))
            continue
        results.append((command, subprocess.run(
            argv_to_run(command, trained), cwd=folder, env=env, capture_output=True,
            text=True, timeout=900)))
    return results


def test_every_readme_command_runs(ran):
    failed = [f"$ {command.text}\n{result.stdout[-1500:]}{result.stderr[-1500:]}"
              for command, result in ran if result is not None and result.returncode != 0]
    assert not failed, "\n\n".join(failed)
    assert sum(result is not None for _, result in ran) >= 30


def test_what_is_not_run_still_parses(ran):
    """raytron's own commands among them parse with `raytron`'s arguments."""
    parser = build_parser()
    for command, result in ran:
        if result is None and command.argv[0] == "raytron":
            argv = command.argv[1:command.argv.index("--")] if "--" in command.argv \
                else command.argv[1:]
            parser.parse_args(argv)  # SystemExit (and the test's failure) when it does not


def test_the_plan_the_readme_quotes_is_what_raytron_plan_prints():
    block = re.search(r"```\n\$ raytron plan (\S+)\n(.*?)```", README.read_text(), re.S)
    printed = subprocess.run([sys.executable, "-m", "raytron.platform.cli", "plan",
                              block.group(1)], capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr
    for line in block.group(2).splitlines():
        if line != "...":
            assert line in printed.stdout.splitlines(), line
