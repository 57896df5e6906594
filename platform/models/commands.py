"""The commands that use a trained model: `raytron generate`, `raytron eval` and
`raytron export`. Their options, and what they print."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from raytron.platform.config.schema import ConfigError

SOURCE_HELP = ("a run directory (its latest committed checkpoint, e.g. runs/tiny), a "
               "checkpoint folder (runs/tiny/checkpoints/step_00000200), a Hugging Face "
               "folder (Llama, Mistral, Qwen2, Qwen3) or the Hub id of such a model in the "
               "local Hugging Face cache (Qwen/Qwen3-0.6B)")


def checked(kind: type, minimum: float, maximum: float | None = None,
            above: bool = False):
    """An argparse type: a number of `kind` in range, or a usage error saying which."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a {kind.__name__}") from None
        low_ok = value > minimum if above else value >= minimum
        if not low_ok or (maximum is not None and value > maximum) or value != value:
            bounds = f"more than {minimum}" if above else f"at least {minimum}"
            bounds += f" and at most {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {bounds}")
        return value
    return parse


def add_generate_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    command.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                         help="a prompt (repeatable)")
    command.add_argument("--prompts-file", metavar="FILE",
                         help="a file of prompts, one per line")
    command.add_argument("--max-new-tokens", type=checked(int, 1), default=64, metavar="N",
                         help="tokens to generate per prompt at most (default 64)")
    command.add_argument("--temperature", type=checked(float, 0), default=1.0, metavar="T",
                         help="sampling temperature; 0 is greedy (default 1.0)")
    command.add_argument("--top-k", type=checked(int, 1), metavar="K",
                         help="sample among the K most likely tokens")
    command.add_argument("--top-p", type=checked(float, 0, 1, above=True), metavar="P",
                         help="sample among the most likely tokens whose probabilities sum "
                              "to P (nucleus sampling)")
    command.add_argument("--seed", type=int, metavar="S",
                         help="random seed, for sampling that repeats")
    command.add_argument("--stop", action="append", default=[], metavar="STRING",
                         help="end a completion before this string (repeatable; \\n and "
                              "\\t in it are a newline and a tab)")
    command.add_argument("--greedy", action="store_true",
                         help="always take the most likely token")
    command.add_argument("--batch-size", type=checked(int, 1), default=1, metavar="B",
                         help="prompts decoded together (default 1: each streams as it is "
                              "generated; with more, each prints when its batch ends)")
    add_device_argument(command)


def add_device_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", metavar="DEVICE",
                         help="cpu or cuda (default: cuda in bf16 when there is a GPU, else "
                              "cpu in fp32)")


GENERATE_EPILOG = """\
The model runs in this process: no Ray, no process group, whatever layout trained it.
Completions end at the model's end token, a --stop string, --max-new-tokens or the end
of its context. The time to the first token and the decode speed print at the end.

Python: from raytron.platform.models import load_model
        load_model("runs/tiny").generate(["The "], max_new_tokens=30, greedy=True)"""


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError([f"--prompts-file {args.prompts_file} cannot be read ({error}). "
                               "Fix: give a UTF-8 text file with one prompt per line."]
                              ) from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(["no prompt given. Fix: add --prompt 'TEXT' (repeatable) or "
                           "--prompts-file FILE."])
    return prompts


def generate_command(args: argparse.Namespace) -> int:
    from raytron.model.engine import PromptError, check_prompts
    from raytron.platform.models.loading import load_model

    prompts = read_prompts(args)
    loaded = load_model(args.source, args.device)
    print(f"Loaded {loaded.source.describe()} ({loaded.model.num_params() / 1e6:.2f}M "
          f"parameters, {next(loaded.model.parameters()).dtype} on "
          f"{next(loaded.model.parameters()).device})", file=sys.stderr)
    stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, stop=stop,
                   batch_size=args.batch_size)

    try:  # every prompt, before any output
        check_prompts([loaded.generator.encode(p) for p in prompts], loaded.model.shape.max_seq_len)
    except PromptError as error:
        raise ConfigError([f"{error}. Fix: shorten the prompt."]) from None

    def stream(_: int, text: str) -> None:
        print(text, end="", flush=True)

    timing = None
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        if len(batch) == 1:
            print(separator(start, len(prompts)) + batch[0], end="", flush=True)
        seed = None if args.seed is None else args.seed + start  # as the Python API seeds
        generations = loaded.generate(batch, on_text=stream if len(batch) == 1 else None,
                                      seed=seed, **options)
        for index, generation in enumerate(generations):
            if len(batch) > 1:
                print(separator(start + index, len(prompts)) + generation.prompt
                      + generation.text, end="")
            print(f"\n[{generation.finish_reason}: {len(generation.tokens)} tokens]")
        if timing is None:
            timing = loaded.generator.timing
        else:
            timing.add(loaded.generator.timing)
    print(f"{timing.new_tokens} tokens; first token after {timing.prefill_s * 1000:.1f} ms "
          f"(prefill); decode {timing.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0


def separator(index: int, total: int) -> str:
    return f"--- {index + 1}/{total} ---\n" if total > 1 else ""


def add_eval_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    command.add_argument("--data", metavar="PATH_OR_SOURCES",
                         help="perplexity of a corpus, as data.sources takes it: a file, "
                              "folder, glob or URI (s3://, gs://; .gz/.zst/.bz2/.lz4 read as "
                              "they are), "
                              "or a YAML list such as '[a.txt, {path: b.jsonl, "
                              "text_field: body}]'")
    command.add_argument("--seq-len", type=checked(int, 2), metavar="N",
                         help="tokens per window (default: the model's context)")
    command.add_argument("--stride", type=checked(int, 1), metavar="S",
                         help="tokens a window moves (default: half of --seq-len); each "
                              "token is scored once, with up to N - S tokens of context")
    command.add_argument("--tasks", metavar="NAMES",
                         help="lm-evaluation-harness tasks instead, comma-separated: names "
                              "lm_eval knows, raytron's own (raytron_word_choice, "
                              "raytron_last_sentence, raytron_next_line, raytron_last_word; "
                              "mtnlg, the MT-NLG "
                              "zero-shot set, or one of it: mtnlg_lambada, mtnlg_piqa, ...) "
                              "or task YAML files (needs the [eval] extra)")
    command.add_argument("--num-fewshot", type=checked(int, 0), metavar="K",
                         help="--tasks: examples before each question (default: the task's)")
    command.add_argument("--limit", type=checked(float, 0, above=True), metavar="N",
                         help="--tasks: the first N samples of each task (below 1: that "
                              "share of them)")
    command.add_argument("--include-path", action="append", default=[], metavar="DIR",
                         help="--tasks: a folder of your own task YAMLs (repeatable)")
    command.add_argument("--data-dir", metavar="DIR",
                         help="--tasks: the folder holding the local copies of the mtnlg "
                              "tasks' data, each as its official release unpacks (README: "
                              "Score tasks)")
    command.add_argument("--apply-chat-template", action="store_true",
                         help="--tasks: each prompt as a user turn of a conversation, in the "
                              "model's chat template, as fine-tuning and serving render it "
                              "(raytron's ChatML for a model without one)")
    command.add_argument("--log-samples", action="store_true",
                         help="--tasks: each sample's prompt, answers and scores in the "
                              "output too")
    command.add_argument("--batch", "--batch-size", type=checked(int, 1), default=8,
                         metavar="B", help="windows (or task requests) per forward pass "
                                           "(default 8)")
    command.add_argument("--split", choices=("all", "held-out"), default="all",
                         help="all documents (default), or only those the run held out of "
                              "training (data.val_share, by content hash)")
    command.add_argument("--name", metavar="NAME",
                         help="name of the result: metrics eval/NAME/loss and "
                              "eval/NAME/perplexity (default: the data's file or folder name)")
    command.add_argument("--output", metavar="FILE",
                         help="where to write the result as JSON (default: "
                              "RUN_DIR/eval/NAME_step<N>.json for a run, else eval_NAME.json)")
    add_mlflow_arguments(command)
    add_device_argument(command)


def add_mlflow_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--run-id", metavar="ID",
                         help="MLflow run to log to (default: the SOURCE run's own)")
    command.add_argument("--tracking-uri", metavar="URI",
                         help="MLflow tracking URI (default: the run's, or "
                              "$MLFLOW_TRACKING_URI)")


def mlflow_target(args: argparse.Namespace, source) -> tuple[str | None, str | None]:
    """(tracking URI, run id): the command line's, else the SOURCE run's."""
    import os

    uri, run_id = source.mlflow_run()
    if args.run_id:
        run_id = args.run_id
        uri = args.tracking_uri or uri or os.environ.get("MLFLOW_TRACKING_URI")
    elif args.tracking_uri:
        uri = args.tracking_uri
    return uri, run_id


def sources_of(data: str) -> list:
    """`--data` through the same loader and checks as data.sources."""
    from raytron.platform.config.load import load_config
    from raytron.platform.config.resolve import packs_samples
    from raytron.platform.config.validate import validate

    try:
        config = load_config(None, [f"data.sources={data}"])
        validate(config)
    except ConfigError as error:
        raise ConfigError([p.replace("data.sources", "--data") for p in error.problems]
                          ) from None
    if packs_samples(config.data):
        raise ConfigError(["--data: raytron eval scores documents (perplexity); chat and "
                           "prompt_completion samples are scored by fine-tuning's validation "
                           "(val_loss on the learned tokens). Fix: give text, JSONL or "
                           "Parquet documents."])
    return config.data.sources


def eval_command(args: argparse.Namespace) -> int:
    if (args.data is None) == (args.tasks is None):
        raise ConfigError(["raytron eval scores --data (perplexity) or --tasks (lm-evaluation-"
                           "harness tasks). Fix: give one of them."])
    if args.tasks is not None:
        from raytron.platform.models.task_eval import task_eval_command

        return task_eval_command(args)
    from raytron.platform.models.evaluate import (
        HELD_OUT,
        default_name,
        evaluate,
        result_metrics,
    )
    from raytron.platform.models.loading import load_model
    from raytron.platform.models.sources import open_source

    sources = sources_of(args.data)
    source = open_source(args.source)
    if args.split == HELD_OUT:
        held_out_problem(source)
    seq_len = args.seq_len or source.shape.max_seq_len
    if seq_len > source.shape.max_seq_len:
        raise ConfigError([f"--seq-len {seq_len} is longer than the model's context "
                           f"({source.shape.max_seq_len}). Fix: give at most that."])
    stride = args.stride or max(1, seq_len // 2)
    if stride > seq_len:
        raise ConfigError([f"--stride {stride} is longer than --seq-len {seq_len}, which would "
                           "leave tokens unscored. Fix: give a stride of at most --seq-len."])
    name = args.name or default_name(sources)
    loaded = load_model(source, args.device)
    result = evaluate(loaded.model, source, sources, name, seq_len, stride, args.batch,
                      args.split)
    output = Path(args.output) if args.output else default_output(source, name)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    skipped = sum(result.skipped.values())
    print(f"{name}: loss {result.loss:.4f}, perplexity {result.perplexity:.3f} over "
          f"{result.tokens} tokens of {result.documents} documents"
          f"{f' ({skipped} bad records skipped: {result.skipped})' if skipped else ''}; "
          f"written to {output}")
    log_result(args, source, result_metrics(result), output,
               f"eval/{name}/loss and eval/{name}/perplexity")
    return 0


def log_result(args: argparse.Namespace, source, metrics: dict[str, float], output: Path,
               what: str) -> None:
    """`metrics` at the checkpoint's step, and the `output` file, to the MLflow run of
    --run-id, else of the SOURCE run (none for a folder outside a run)."""
    from raytron.platform.models.evaluate import log_to_mlflow

    uri, run_id = mlflow_target(args, source)
    if run_id and uri:
        log_to_mlflow(metrics, source.step, uri, run_id, output)
        print(f"Logged {what} to MLflow run {run_id}")
    elif run_id:
        print("Not logged to MLflow: the run's tracking URI holds credentials raytron does "
              "not save. Fix: set MLFLOW_TRACKING_URI or --tracking-uri.", file=sys.stderr)


def held_out_problem(source) -> None:
    """--split held-out means the documents the run held out of its sources by hash."""
    data = source.config.data if source.config else None
    if data is None or data.validation_sources or data.val_share <= 0:
        why = ("a Hugging Face folder held nothing out" if data is None else
               "the run validated on data.validation_sources and trained on all of its "
               "sources" if data.validation_sources else "the run held nothing out "
               "(data.val_share=0)")
        raise ConfigError([f"--split held-out: {why}. Fix: use --split all (with the run's "
                           "validation sources as --data, if it had any)."])


def default_output(source, name: str) -> Path:
    if source.run_dir is not None:
        return source.run_dir / "eval" / f"{name}_step{source.step}.json"
    return Path(f"eval_{name}.json")


def add_export_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    command.add_argument("out", metavar="OUT", help="a new (or empty) folder to write")
    command.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                         default="float32", help="of the saved weights (default float32)")
    command.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                         help="larger weights are split into shards of at most SIZE, with "
                              "model.safetensors.index.json (default 5GB; e.g. 500MB)")
    command.add_argument("--merge", action="store_true",
                         help="a LoRA run (train.lora): write the whole model with the "
                              "adapters folded into its weights, instead of the adapters in "
                              "PEFT's format")
    command.add_argument("--mlflow", action="store_true",
                         help="log the folder to the run's MLflow run as a transformers model "
                              "(task text-generation); needs the hf extra: pip install "
                              "'raytron[hf]'")
    command.add_argument("--register", metavar="NAME",
                         help="also register it in the MLflow model registry as NAME "
                              "(implies --mlflow)")
    add_mlflow_arguments(command)


EXPORT_EPILOG = """\
OUT gets config.json (LlamaConfig), model.safetensors (or shards and an index),
tokenizer.json, tokenizer_config.json and generation_config.json:

  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained(OUT)
  tokenizer = AutoTokenizer.from_pretrained(OUT)

The folder is also a SOURCE for generate, eval and model.init_from.

A LoRA run (train.lora) exports its adapters in PEFT's format instead:
adapter_config.json and adapter_model.safetensors, on the base that
base_model_name_or_path names (model.init_from's Hugging Face model, or else the base
written to OUT/base):

  from peft import PeftModel
  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT)

With --merge it writes the whole model with the adapters folded in, as above."""


def export_command(args: argparse.Namespace) -> int:
    from raytron.platform.models.export import (
        export_adapter,
        export_hugging_face,
        log_to_mlflow,
    )
    from raytron.platform.models.sources import open_source

    source = open_source(args.source)
    uri, run_id = mlflow_target(args, source)
    to_mlflow = args.mlflow or args.register
    if to_mlflow and not (uri and run_id):
        why = ("SOURCE is no run with an MLflow run" if not run_id else
               "the run's tracking URI holds credentials, which raytron does not save")
        raise ConfigError([f"--mlflow: {why}. Fix: give --run-id ID and --tracking-uri URI "
                           "(or set MLFLOW_TRACKING_URI)."])
    if to_mlflow and importlib.util.find_spec("transformers") is None:
        raise ConfigError(["--mlflow logs a transformers model, and transformers is not "
                           "installed. Fix: pip install 'raytron[hf]'."])
    adapters = source.config is not None and source.config.train.lora.rank > 0
    if args.merge and not adapters:
        raise ConfigError([f"--merge: {source.describe()} has no LoRA adapters to fold in "
                           "(it was not trained with train.lora). Fix: leave --merge out."])
    if adapters and to_mlflow and not args.merge:
        raise ConfigError(["--mlflow logs a whole transformers model, and a LoRA run exports "
                           "its adapters. Fix: add --merge."])
    out = Path(args.out)
    files = export_adapter(source, out, args.dtype) if adapters and not args.merge else \
        export_hugging_face(source, out, args.dtype, args.max_shard_size)
    print(f"Exported {source.describe()} to {out}: {', '.join(f.name for f in files[:6])}"
          f"{f' and {len(files) - 6} more' if len(files) > 6 else ''}")
    if to_mlflow:
        model_uri = log_to_mlflow(out, uri, run_id, args.register)
        registered = f", registered as '{args.register}'" if args.register else ""
        print(f"Logged to MLflow run {run_id} as {model_uri}{registered}")
    return 0
