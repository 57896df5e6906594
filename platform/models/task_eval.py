"""`raytron eval --tasks`: lm-evaluation-harness tasks scored on a model in this process
(`harness.py`), with lm_eval's own task definitions, few-shot sampling and metrics.

Offline first: tasks read local files (task YAMLs with `dataset_path: json` and
`data_files`, found through `--include-path`), raytron's own tasks need nothing
(`configs/tasks/`), and where the Hugging Face Hub cannot be reached its offline
switches are set before anything imports `datasets`, so that no call waits on it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from raytron.platform.config.schema import ConfigError

OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
HUB = "https://huggingface.co"


def raytron_tasks() -> Path:
    """The folder of raytron's own tasks (installed with its configs)."""
    from raytron.platform.config.load import preset_dirs

    return next(folder / "tasks" for folder in preset_dirs() if (folder / "tasks").is_dir())


def offline_unless_hub_answers(timeout_s: float = 3.0) -> bool:
    """Sets the Hub's offline switches, unless they are set already or its host takes a
    connection within `timeout_s`; True when offline."""
    if any(name in os.environ for name in OFFLINE_SWITCHES):
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    address = urlparse(os.environ.get("HF_ENDPOINT", HUB))
    try:
        socket.create_connection((address.hostname, address.port or 443), timeout_s).close()
        return False
    except OSError:
        for name in OFFLINE_SWITCHES:
            os.environ[name] = "1"
        return True


def require_harness(key: str) -> None:
    """A ConfigError, naming `key`, where lm-evaluation-harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError([f"{key} needs lm-evaluation-harness. Fix: pip install -e "
                           "'.[eval]' (or pip install lm_eval)."])


def task_manager(tasks: Sequence[str], include_paths: Sequence[str], key: str = "--tasks",
                 data_dir: str | None = None):
    """lm_eval's index of tasks, raytron's and `include_paths`' among them, with
    `data_dir` for the tasks that read local copies of their data (the `mtnlg` tasks); a
    ConfigError naming any of `tasks` it does not hold (nor is a task YAML file)."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on every custom task
    data = str(Path(data_dir).absolute()) if data_dir else None
    options = dict(include_path=[str(raytron_tasks()), *include_paths],
                   metadata=index_metadata(data))
    manager = TaskManager(include_defaults=False, **options)  # ~0.1 s against lm_eval's
    if not all(task in manager.all_tasks for task in tasks):  # 14,000 tasks' ~12 s
        # a stock task, or a YAML file that may name one
        manager = TaskManager(**options) if include_paths else whole_index(data)
    unknown = [task for task in tasks if task not in manager.all_tasks and not
               Path(task).is_file()]
    if unknown:
        where = "--include-path" if key == "--tasks" else "a task YAML file's path"
        raise ConfigError([f"{key}: no task named {', '.join(unknown)}. Fix: give a name "
                           "lm_eval knows (`lm-eval ls tasks`; raytron's own: "
                           "raytron_word_choice, raytron_last_sentence, raytron_next_line, "
                           "raytron_last_word; mtnlg and its mtnlg_* tasks), a task YAML "
                           f"file, or the folder of your task YAMLs with {where}."])
    return manager


def index_metadata(data_dir: str | None) -> dict | None:
    """What the `mtnlg` tasks' YAMLs read their data folder from."""
    return {"data_dir": data_dir} if data_dir else None


@functools.lru_cache(maxsize=2)
def whole_index(data_dir: str | None):
    """lm_eval's whole index and raytron's tasks, built once per process and absolute
    `data_dir`: neither changes while it runs (a user's folder of YAMLs may, and is
    indexed anew each time)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(raytron_tasks())], metadata=index_metadata(data_dir))


def score_tasks(model, tasks: Sequence[str], manager, num_fewshot: int | None,
                limit: float | None, log_samples: bool, key: str = "--tasks",
                chat: bool = False) -> dict:
    """lm_eval's results of `tasks` (names in `manager`, or task YAML files) on `model`
    (an lm_eval model); with `chat`, each prompt in the model's chat template."""
    from lm_eval import simple_evaluate

    try:
        return simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot,
                               limit=limit, task_manager=manager, log_samples=log_samples,
                               apply_chat_template=chat)
    except FileNotFoundError as missing:
        raise ConfigError([f"{key}: a task's data was not found: {missing}. Fix: put the "
                           "file there (the mtnlg tasks read the data folder, --data-dir or "
                           "train.eval_task_data_dir); a task YAML's data_files are read from "
                           "the folder raytron runs in: give absolute paths, or run from the "
                           "folder they are relative to."]) from None
    except ConnectionError as unreachable:
        raise ConfigError([f"{key}: a task's data is not in the Hugging Face cache and the "
                           f"Hub cannot be reached ({unreachable}). Fix: run once where the "
                           "Hub answers (the data stays in HF_HOME's cache), or give the task "
                           "as a YAML reading local files."]) from None


def task_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """`<prefix>/<task>/<metric>` for each number lm_eval reports (a filter other than
    `none` appended to the metric's name), standard errors left out."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, chosen = key.partition(",")
            if isinstance(value, int | float) and not isinstance(value, bool) and \
                    chosen and not metric.endswith("_stderr"):
                suffix = "" if chosen == "none" else f"_{chosen}"
                metrics[f"{prefix}/{task}/{metric}{suffix}"] = float(value)
    return metrics


def results_json(results: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable) + "\n"


def task_eval_command(args) -> int:
    """`raytron eval SOURCE --tasks ...`: lm_eval's table printed, its results written
    beside the run's other evaluations and logged to its MLflow run."""
    from raytron.platform.models.commands import default_output, log_result
    from raytron.platform.models.loading import load_model
    from raytron.platform.models.sources import open_source

    require_harness("--tasks")
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    if not tasks:
        raise ConfigError(["--tasks is empty. Fix: name at least one task, e.g. "
                           "--tasks raytron_next_line."])
    source = open_source(args.source)
    if offline_unless_hub_answers():
        print("The Hugging Face Hub does not answer: offline (HF_HUB_OFFLINE=1); tasks read "
              "local files and the datasets cache.", file=sys.stderr)
    manager = task_manager(tasks, args.include_path, data_dir=args.data_dir)
    from raytron.platform.models.harness import RaytronLM

    model = RaytronLM(load_model(source, args.device), args.batch)
    results = score_tasks(model, tasks, manager, args.num_fewshot, args.limit,
                          args.log_samples, chat=args.apply_chat_template)
    from lm_eval.utils import make_table

    print(make_table(results))
    output = Path(args.output) if args.output else default_output(source, "tasks")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(results_json(results))
    print(f"Written to {output}")
    metrics = task_metrics(results)
    log_result(args, source, metrics, output, f"{len(metrics)} eval/<task>/<metric> values")
    return 0
