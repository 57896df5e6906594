"""`raytron`: the command line. Every command validates the config before touching Ray."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from pathlib import Path

from raytron.platform.config.load import load_config, preset_names, to_yaml
from raytron.platform.config.schema import ConfigError, RaytronConfig
from raytron.platform.control.console import ConsoleStream

EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

CONFIG_HELP = """\
CONFIG is a YAML file or the name of a shipped preset ({presets}); the default is
'tiny'. OVERRIDES are key=value pairs applied after it, e.g.

  train.steps=1000 train.lr=3e-4 model.n_layers=8 run.name=longer
  data.sources='[corpus/, notes.jsonl]'   (files, folders, globs or URIs)
  data.sources='[{{path: corpus/, document: paragraph, weight: 2}}]'
  data.sources.0.path=notes.jsonl data.sources.0.text_field=body

`raytron config` prints every key with its current value."""

TRAIN_EPILOG = """\
The run lives in <run.root>/<run.name> (default runs/<preset>): resolved config,
tokenizer.json, checkpoints/ and the id of its MLflow run. Running the same command
again resumes from its last committed checkpoint with the same data order, so the
losses continue exactly as if the run had never stopped. On resume, optimizer and
schedule keys (train.lr, min_lr, warmup_steps, steps, weight_decay, beta1, beta2,
grad_clip, global_batch) apply from the resumed step on; keys that decide the model or
the data (model.*, data.seq_len, data.sources, train.seed, data.shuffle_window, the
tokenizer...) are refused; the layout and everything else may change. A checkpoint that
cannot be loaded is skipped for the one before; when none loads the run ends (exit 1)
without touching them. A resume whose sources list other files than its checkpoint
recorded is refused, unless data.on_new_files=next_epoch (files added are read from the
next epoch on). One training per run: a second one of the same run (or checkpoint.dir)
is refused (exit 2) while the first holds the run's lease; `raytron status` names it.

train.steps=auto trains the whole global batches that the sources with an epoch limit
(data.sources.<i>.epochs) give, counted by one pass before training. A numbered
train.steps that the data runs out before ends the run at once with a checkpoint.

cluster.workers follows the layout (pp * dp * tp) unless given. A pipeline's preset
micro-batch is lowered to give its schedule enough micro-batches unless
train.micro_batch is given.

Ray: joins cluster.address or $RAY_ADDRESS when set (e.g. under `ray job submit`),
otherwise starts a local Ray.

Failures: the worker group restarts from the in-memory snapshot of the last finished
step (checkpoint.memory_interval, default auto: every step where the nodes' memory holds
them; its node's and the next node's keepers hold it), else the last committed
checkpoint, up to faults.max_restarts times; faults.hang_timeout_s fails a rank without
progress (faults.checkpoint_timeout_s while it saves, faults.eval_timeout_s while it
validates). faults.mode=replicas restarts nothing: each worker is a data-parallel replica
of the whole model, the others compute a lost replica's step again without it, and Ray
Train's replacement joins from the snapshot keepers (up to faults.max_restarts
replacements). faults.inject='[kill rank 1 at step 7]' runs a failure drill. Elastic: with
parallel.dp=auto the run shrinks when capacity drops and grows back when it returns
(faults.min_dp, faults.schedule_timeout_s, faults.capacity_check_s), replicas too (the
others go on; a relaunch grows it); a node Ray drains
(preemption) is checkpointed away from first. checkpoint.async_save=true writes
checkpoints in the background. `raytron status RUN_DIR` shows where a run stands.

Tracking: tracking.uri or $MLFLOW_TRACKING_URI, otherwise
a SQLite store at <run.root>/mlflow.db; view it with
  mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
then open http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning (raytron
train and raytron status print each run's own page). Each node's CPU, memory, disk,
network (and GPU) are logged as system metrics; tracking.system_metrics=false stops that.
Credentials in URIs are used, and shown as user:***@ in everything raytron writes.

Exit status: 0 finished (or already finished), 1 training failed (or stopped for a failure
no restart fixes: its data ran out, its checkpoints cannot be loaded), 2 invalid config
(or a change a resumed run cannot take, or another training holds the run)."""


SUBMIT_EPILOG = """\
The job runs `raytron train CONFIG OVERRIDES` in the cluster, with this machine's raytron
code (the cluster's image needs raytron's dependencies, not raytron: cluster/Dockerfile).
Paths of the run (run.root, checkpoint.dir, a sqlite tracking.uri, data sources,
data.tokenizer, model.init_from) are made absolute when every node of the cluster is this
machine (its dashboard says), and must otherwise be absolute paths on the cluster's shared
storage or URIs. A config with credentials in a
URI is refused: give the cluster its credentials as environment variables. A Ray token
(token authentication) is read from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, as `ray start` writes it; nothing needs exporting.

It prints the job id, its Ray dashboard page and, once the job has opened it, its MLflow
run; --follow streams the job's logs until it ends and exits with its status (0 finished,
1 failed, 2 invalid config). Ctrl-C stops following, not the job.

  raytron submit configs/gpt2-124m.yaml run.root=/mnt/raytron/runs --address http://127.0.0.1:8265
  raytron submit --serve /mnt/raytron/runs/tiny --follow -- --host 0.0.0.0 --replicas 2"""


PLAN_EPILOG = """\
Memory per device is estimated for each pipeline rank: fp32 weights, gradients and AdamW
state (sharded over dp as parallel.dp_shard says) and the activations of the
micro-batches in flight, with and without recomputation. With cluster.device_memory_gb
set, a layout that does not fit is refused (exit status 2), here and by `raytron train`."""


def build_parser() -> argparse.ArgumentParser:
    config_help = CONFIG_HELP.format(presets=", ".join(preset_names()))
    parser = argparse.ArgumentParser(
        prog="raytron",
        description="Train GPT-style language models on Ray with 3D parallelism, "
        "checkpoints that resume exactly, and MLflow tracking; fine-tune them on chats "
        "(configs/sft-tiny.yaml), generate with them, evaluate them, serve them behind an "
        "OpenAI-compatible API and export them to Hugging Face.",
        epilog="Run `raytron COMMAND --help` for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary, epilog, handler in (
        ("train", "train a model, or resume its run from the last checkpoint",
         config_help + "\n\n" + TRAIN_EPILOG, train_command),
        ("config", "print the resolved config (after validation) as YAML", config_help,
         config_command),
        ("plan", "print the layout, parameters and memory per device, pipeline bubble and "
         "FLOPs of a config, without starting anything", config_help + "\n\n" + PLAN_EPILOG,
         plan_command),
    ):
        command = commands.add_parser(name, help=summary, description=summary, epilog=epilog,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_arguments(command)
        command.set_defaults(handler=handler)
    tokenizer = commands.add_parser(
        "tokenizer", help="tokenizer tools", description="Tokenizer tools.")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", metavar="ACTION",
                                                  required=True)
    train_tokenizer = tokenizer_commands.add_parser(
        "train", help="train a byte-level BPE tokenizer on a config's sources",
        description="Train a byte-level BPE tokenizer (data.vocab_size tokens, EOS "
        "<|endoftext|>) on up to data.tokenizer_sample_mb of the training documents of "
        "data.sources, each source contributing its weight's share; held-out validation "
        "documents are left out. Reuse it with data.tokenizer=PATH.",
        epilog=config_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(train_tokenizer)
    train_tokenizer.set_defaults(handler=train_tokenizer_command)
    status = commands.add_parser(
        "status", help="where a run stands: step, layout, checkpoints, restarts, failures",
        description="Read a run directory (<run.root>/<run.name>), its checkpoints and its "
        "MLflow run, and print its state, step, layout, committed checkpoints, restarts "
        "and failures. Starts nothing.")
    status.add_argument("run_dir", metavar="RUN_DIR", help="e.g. runs/tiny")
    status.set_defaults(handler=status_command)
    runs = commands.add_parser(
        "runs", help="the runs of an MLflow store in a table, newest first",
        description="One line per run of an experiment: name, state, last step, loss, "
        "validation perplexity, last layout (pp x dp x tp; pp x dp x cp x tp with context "
        "parallelism), restarts, start time; newest first. Starts nothing.")
    runs.add_argument("--tracking-uri", metavar="URI",
                      help="the store (default: $MLFLOW_TRACKING_URI, else "
                           "sqlite:///runs/mlflow.db, the local runs' store)")
    runs.add_argument("--experiment", default="raytron",
                      help="the experiment (tracking.experiment; default raytron)")
    runs.add_argument("--limit", type=int, default=50, metavar="N",
                      help="at most N runs (default 50)")
    runs.set_defaults(handler=runs_command)
    add_submit_command(commands, config_help)
    train_tokenizer.add_argument("--output", default="tokenizer.json", metavar="PATH",
                                 help="where to write the tokenizer (default: tokenizer.json)")
    add_model_commands(commands)
    return parser


def add_submit_command(commands, config_help: str) -> None:
    from raytron.platform.control.submit import DEFAULT_ADDRESS

    summary = "run `raytron train` (or `raytron serve`) as a Ray job on a Ray cluster"
    submit = commands.add_parser("submit", help=summary, description=summary,
                                 epilog=config_help + "\n\n" + SUBMIT_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(submit)
    address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    submit.add_argument("--address", metavar="URL",
                        default=address if address.startswith("http") else DEFAULT_ADDRESS,
                        help="the cluster's Ray dashboard (default: $RAY_API_SERVER_ADDRESS "
                             f"or an http $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    submit.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends; exit with its status")
    submit.add_argument("--serve", metavar="SOURCE",
                        help="serve this model (an absolute path on the cluster) instead of "
                             "training; `raytron serve` options go after `--`")
    submit.add_argument("--wait", type=float, default=600, metavar="SECONDS",
                        help="without --follow: how long to wait for the job's MLflow run (or "
                             "endpoint) to print it (default 600)")
    submit.set_defaults(handler=submit_command)


def add_model_commands(commands) -> None:
    """generate, eval, export: what is done with a trained model."""
    from raytron.platform.models import commands as model_commands
    from raytron.platform.serving import command as serve_command

    for name, summary, epilog, add_arguments, handler in (
        ("generate", "generate text from a trained model, streamed token by token",
         model_commands.GENERATE_EPILOG, model_commands.add_generate_arguments,
         model_commands.generate_command),
        ("eval", "score a model: perplexity on a corpus (--data), or lm-evaluation-harness "
         "tasks (--tasks); printed, written as JSON and logged to MLflow", None,
         model_commands.add_eval_arguments, model_commands.eval_command),
        ("export", "write a model as a Hugging Face folder that transformers loads",
         model_commands.EXPORT_EPILOG, model_commands.add_export_arguments,
         model_commands.export_command),
        ("serve", "serve a model behind an OpenAI-compatible API on Ray Serve",
         serve_command.SERVE_EPILOG, serve_command.add_serve_arguments,
         serve_command.serve_command),
    ):
        command = commands.add_parser(name, help=summary, description=summary, epilog=epilog,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(command)
        command.set_defaults(handler=handler)


def add_config_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                         help="preset name or YAML file (default: tiny)")
    command.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="config overrides, applied in order")


def split_config_argument(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`raytron train lr=1` has no CONFIG: argparse put the first override there."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, overrides


def checked_config(config_arg: str | None, overrides: list[str], *, initial_model: bool = True,
                   fit: bool = True) -> RaytronConfig:
    """The command line's config, validated. With model.init_from (unless not
    `initial_model`: a submitted job checks it where its path is), in the shape of the
    weights it names, and validated again. With `fit`, refused when cluster.device_memory_gb
    is set and the layout's busiest device needs more."""
    from raytron.platform.config.validate import memory_problems, raise_problems, validate

    config = load_config(*split_config_argument(config_arg, overrides))
    validate(config)
    if initial_model and config.model.init_from:
        from raytron.platform.models.initial import with_initial_model  # torch

        config = with_initial_model(config)
        validate(config)
    if fit:
        raise_problems(memory_problems(config))
    return config


def shown_config(args: argparse.Namespace) -> RaytronConfig:
    """The config `raytron config`, `plan` and `tokenizer train` show or use: checked, with
    parallel.dp=auto at its largest value; `plan` says itself whether it fits."""
    from raytron.platform.config.validate import resolve_layout

    return resolve_layout(checked_config(args.config, args.overrides, fit=False))


def train_command(args: argparse.Namespace) -> int:
    config = checked_config(args.config, args.overrides)  # refused in a second, before torch
    from raytron.platform.control.run import train

    return train(config)  # an elastic run keeps dp=auto and sizes each launch


def config_command(args: argparse.Namespace) -> int:
    print(to_yaml(shown_config(args)), end="")
    return 0


def train_tokenizer_command(args: argparse.Namespace) -> int:
    from raytron.platform.control.corpus import stream_spec, train_tokenizer

    config = shown_config(args)
    tokenizer = train_tokenizer(config, stream_spec(config))
    tokenizer.save(args.output)
    print(f"Saved a {tokenizer.get_vocab_size()}-token tokenizer to {args.output}. "
          f"Use it with data.tokenizer={args.output}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from raytron.platform.config.plan import describe, make_plan
    from raytron.platform.config.validate import memory_problems

    config = shown_config(args)
    plan = make_plan(config)
    print(describe(plan))
    problems = [] if plan.fits() else memory_problems(config)
    if problems:
        print(f"raytron: the layout does not fit:\n{ConfigError(problems)}", file=sys.stderr)
    return EXIT_CONFIG_ERROR if problems else 0


def submit_command(args: argparse.Namespace) -> int:
    from raytron.platform.control import submit as submitting
    from raytron.platform.storage.lease import refuse_if_held, run_folders
    from raytron.platform.storage.run_dir import RunPaths

    config = None
    if not args.serve:  # model.init_from is checked in the job, where its path is
        config = checked_config(args.config, args.overrides, initial_model=False)
        refuse_if_held(run_folders(RunPaths.of(config)))  # a training of this run is running
    client = submitting.connect(args.address)
    local = submitting.runs_on_this_machine(args.address)
    if config is None:  # the positional arguments are serving options, given after `--`
        options = [item for item in (args.config, *args.overrides) if item is not None]
        submission = submitting.serving_submission(args.serve, options, local)
    else:
        submission = submitting.training_submission(config, local)
    return submitting.submit(client, submission, args.address, args.follow, args.wait)


def status_command(args: argparse.Namespace) -> int:
    from raytron.platform.control.status import describe_run

    print(describe_run(args.run_dir))
    return 0


def runs_command(args: argparse.Namespace) -> int:
    from raytron.platform.control.runs_table import runs_table
    from raytron.platform.storage.tracking import tracking_uri

    print(runs_table(tracking_uri(args.tracking_uri, Path("runs").absolute()),
                     args.experiment, args.limit))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `raytron` command. What it prints has credentials in URIs redacted."""
    args = build_parser().parse_args(argv)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ConsoleStream(sys.stdout), ConsoleStream(sys.stderr)
    try:
        return args.handler(args)
    except ConfigError as error:
        what = error.heading or {
            "status": "cannot read the run", "generate": "cannot generate",
            "eval": "cannot evaluate", "export": "cannot export", "serve": "cannot serve",
            "submit": "cannot submit"}.get(args.command, "invalid config")
        print(f"raytron: {what}:\n{error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:  # before anything was started that needs stopping
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        sys.stdout, sys.stderr = streams


def run() -> None:
    """The `raytron` program: `main`, then an exit that skips the interpreter's teardown
    (freeing torch's, Ray's and MLflow's modules: ~2 s on 2 cores) once what an exit must
    do is done: threads joined and every exit handler run (Ray's shutdown, MLflow's)."""
    status = [1]  # an uncaught exception's
    atexit.register(exit_without_teardown, status)  # the first: it runs after all others
    try:
        status[0] = main()
    except SystemExit as exiting:  # argparse: --help, a bad argument
        code = exiting.code
        status[0] = code if isinstance(code, int) else int(code is not None)
        raise
    except KeyboardInterrupt:
        status[0] = EXIT_INTERRUPTED
        raise
    sys.exit(status[0])


def exit_without_teardown(status: list[int]) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status[0])


if __name__ == "__main__":
    run()
