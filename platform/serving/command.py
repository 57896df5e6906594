"""`raytron serve`: the serving application on a local Ray or the cluster's, in the
foreground (Ctrl-C stops it) or left running with --detach. What can be refused is
refused before Ray starts: an empty key, a server other machines reach without one, a
port that is taken."""

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from raytron.model.engine_limits import EngineLimits
from raytron.platform.config.schema import ConfigError
from raytron.platform.models.commands import SOURCE_HELP, checked
from raytron.platform.serving.access import API_KEY_VARIABLE, checked_key, loopback
from raytron.platform.serving.adapter_names import (
    DEFAULT_MAX_ADAPTERS,
    DEFAULT_MAX_RANK,
    AdapterError,
    AdapterSettings,
    name_problem,
)
from raytron.platform.serving.gpus import default_gpus, gpus_problem
from raytron.platform.serving.limits import DEFAULT_LIMITS, Limits
from raytron.platform.serving.port import port_problem
from raytron.platform.serving.readiness import ServeStartFailed, wait_until_running
from raytron.platform.serving.requests import (
    MAX_BODY_BYTES,
    MAX_LOGPROBS,
    MAX_N,
    MAX_SEQUENCES,
    MAX_STOP,
)

APP_NAME = "raytron"
BODY_MIB = MAX_BODY_BYTES >> 20

SERVE_EPILOG = f"""\
Routes (OpenAI-compatible): POST /v1/completions, POST /v1/chat/completions (with the
model's chat template), GET /v1/models, GET /health, POST /tokenize, POST /detokenize,
GET /tokenizer_info (vLLM's shapes), GET /stats (the engine's). Fields: model, prompt
(a string, a list of strings, token ids, or a list of token-id lists), messages,
max_tokens (0 with echo: score the prompt alone), temperature (0 to 2; below 1e-5:
greedy), top_p, seed (64-bit), stop (up to {MAX_STOP} strings), n (up to {MAX_N}), stream
(server-sent events; stream_options.include_usage), echo, logprobs (completions: up to
{MAX_LOGPROBS}; chats: true with top_logprobs), presence_penalty and frequency_penalty (-2
to 2), repetition_penalty (0.01 to 10). A request may hold {BODY_MIB} MiB and ask for
{MAX_SEQUENCES} completions (prompts x n); what is beyond a limit gets a 400 (413) naming
it. Each replica decodes every request, streamed or not, in one batch that requests
join and leave at every step (--max-num-seqs at once; prompts prefilled in chunks of a
--token-budget per step, so a long prompt never stalls the others); a client that
leaves cancels its sequences. One beyond --max-queued gets a 429 with Retry-After,
one longer than --request-timeout-s a 504. --max-replicas autoscales. Each replica asks
Ray for --num-gpus GPUs, so that Ray places replicas on GPUs no one else holds. Each
request is one line of the replica's log; --mlflow also logs request metrics every 10 s.

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "tiny", "prompt": "A class", "max_tokens": 20}}'

LoRA adapters (--adapter NAME=PATH, --adapters-dir) are served on the one copy of the
model: a request's model 'BASE:NAME' (as /v1/models lists it) or 'NAME' picks one, and
requests for different adapters and for the base decode in the same batch, each row
with its own adapter. An unknown model is a 404 (code model_not_found).

The API key may come from ${API_KEY_VARIABLE} instead of --api-key (which other users
of the machine can see in its process list); set and empty, it is refused. A --host
other machines reach needs a key (or --allow-unauthenticated); put TLS in front of it
(a reverse proxy or a load balancer): the key crosses the network in every request.
Ray: joins $RAY_ADDRESS when set, otherwise starts a local Ray of its own that lives as
long as this command (--detach needs a cluster: `ray start --head`); a port that is
taken is refused before. For `serve run` and a KubeRay RayService the application is
raytron.platform.serving.app:application, with arguments source, name, max_num_seqs,
max_model_len, token_budget, replicas, min_replicas, max_replicas,
target_ongoing_requests, tracking_uri, num_gpus, max_queued, request_timeout_s,
adapters (a mapping NAME: PATH), adapters_dir, max_adapters, max_lora_rank:

  serve run raytron.platform.serving.app:application source=runs/tiny max_num_seqs=16"""


def add_serve_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    command.add_argument("--name", metavar="NAME",
                         help="the model's name in requests (default: the run's or folder's "
                              "name)")
    command.add_argument("--replicas", type=checked(int, 1), default=1, metavar="N",
                         help="replicas of the model (default 1)")
    command.add_argument("--max-replicas", type=checked(int, 1), metavar="N",
                         help="autoscale between --min-replicas and N replicas by load "
                              "(instead of a fixed --replicas)")
    command.add_argument("--min-replicas", type=checked(int, 0), default=1, metavar="N",
                         help="with --max-replicas: the fewest replicas (default 1; 0 frees "
                              "every device when idle)")
    command.add_argument("--target-ongoing-requests", type=checked(float, 0.1), default=8.0,
                         metavar="R", help="with --max-replicas: requests in flight per "
                                           "replica that autoscaling aims at (default 8)")
    command.add_argument("--num-gpus", type=gpus_per_replica, metavar="G",
                         help="GPUs per replica: 0 serves on CPUs, a fraction packs replicas "
                              "on a GPU (0.5: two per GPU); Ray schedules replicas by it "
                              "(default: 1 where the cluster has GPUs, else 0)")
    command.add_argument("--max-num-seqs", type=checked(int, 1),
                         default=EngineLimits.max_num_seqs, metavar="N",
                         help="sequences a replica decodes together: its KV cache's slots "
                              f"(default {EngineLimits.max_num_seqs})")
    command.add_argument("--max-model-len", type=checked(int, 2), metavar="L",
                         help="positions of each slot, prompt and output (default: the "
                              "model's context); with --max-num-seqs, the KV cache's size")
    command.add_argument("--token-budget", type=checked(int, 2),
                         default=EngineLimits.token_budget, metavar="T",
                         help="tokens a decoding step computes: one per decoding sequence, "
                              "the rest prefill chunks (default "
                              f"{EngineLimits.token_budget}; more than --max-num-seqs)")
    command.add_argument("--adapter", type=adapter_argument, action="append", default=[],
                         metavar="NAME=PATH",
                         help="serve a LoRA adapter on the model, asked for as model "
                              "'BASE:NAME' or 'NAME': a PEFT adapter folder (`raytron "
                              "export` of a LoRA run writes one) or a LoRA run trained on "
                              "this model; repeat for more")
    command.add_argument("--adapters-dir", metavar="DIR",
                         help="serve each adapter folder DIR/NAME as adapter NAME, read on "
                              "the first request for it (one added while serving is found; "
                              "one changed is read again)")
    command.add_argument("--max-adapters", type=checked(int, 1), default=DEFAULT_MAX_ADAPTERS,
                         metavar="N",
                         help="adapters a replica holds on its device at once; the least "
                              "recently used one idle makes room for another (default "
                              f"{DEFAULT_MAX_ADAPTERS})")
    command.add_argument("--max-lora-rank", type=checked(int, 1), default=DEFAULT_MAX_RANK,
                         metavar="R",
                         help="the largest adapter rank served; the device holds "
                              f"--max-adapters adapters of it (default {DEFAULT_MAX_RANK})")
    command.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1: this machine only)")
    command.add_argument("--port", type=checked(int, 1, 65535), default=8000,
                         help="port to listen on (default 8000)")
    command.add_argument("--api-key", metavar="KEY",
                         help=f"require Authorization: Bearer KEY (or set ${API_KEY_VARIABLE})")
    command.add_argument("--allow-unauthenticated", action="store_true",
                         help="serve a --host other than a loopback address without a key "
                              "(anyone who reaches it can use it)")
    command.add_argument("--max-queued", type=checked(int, 1),
                         default=DEFAULT_LIMITS.max_queued, metavar="N",
                         help="requests a replica holds at once, generating or waiting; one "
                              f"more gets a 429 (default {DEFAULT_LIMITS.max_queued})")
    command.add_argument("--request-timeout-s", type=checked(float, 0, 86400, above=True),
                         default=DEFAULT_LIMITS.request_timeout_s, metavar="S",
                         help="a request that takes longer gets a 504 (default "
                              f"{DEFAULT_LIMITS.request_timeout_s:g})")
    command.add_argument("--start-timeout-s", type=checked(float, 0, 86400, above=True),
                         default=900.0, metavar="S",
                         help="give up when the replicas do not run within S seconds (what "
                              "Serve waits for is printed every 30 s; default 900)")
    command.add_argument("--detach", action="store_true",
                         help="leave the application running in the cluster and return")
    command.add_argument("--mlflow", action="store_true",
                         help="log request metrics (latency p50/p99, tokens/s, errors) every "
                              "10 s to MLflow, experiment raytron-serve")
    command.add_argument("--tracking-uri", metavar="URI",
                         help="with --mlflow: the tracking server (default: the run's, else "
                              "$MLFLOW_TRACKING_URI)")


def gpus_per_replica(text: str) -> float:
    """--num-gpus: a number of GPUs Ray can give one replica, or a usage error."""
    value = checked(float, 0)(text)
    problem = gpus_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def adapter_argument(text: str) -> tuple[str, str]:
    """--adapter NAME=PATH, or a usage error."""
    name, equals, path = text.partition("=")
    problem = name_problem(name) if equals and path else \
        f"give NAME=PATH (an adapter's name, then its folder), not {text!r}"
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return name, path


def adapter_settings(args: argparse.Namespace, source) -> AdapterSettings:
    """The adapters the flags serve, each read and checked against the model now."""
    from raytron.platform.serving.adapters import AdapterLibrary

    names = [name for name, _ in args.adapter]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError([f"--adapter names {', '.join(twice)} more than once. Fix: give "
                           "each adapter a name of its own."])
    if args.adapters_dir is not None and not Path(args.adapters_dir).expanduser().is_dir():
        raise ConfigError([f"--adapters-dir {args.adapters_dir} is not a folder. Fix: create "
                           "it (adapters put there are served by their folder's name)."])
    def absolute(path: str) -> str:  # what the replicas, elsewhere, can find
        return str(Path(path).expanduser().resolve())

    settings = AdapterSettings({name: absolute(path) for name, path in args.adapter},
                               args.adapters_dir and absolute(args.adapters_dir),
                               args.max_adapters, args.max_lora_rank)
    library = AdapterLibrary(settings, source)
    try:
        for name in names:
            library.adapter(name)
    except AdapterError as problem:
        raise ConfigError([f"--adapter: {problem}"]) from None
    return settings


def replica_gpus(requested: float | None, cluster_gpus: float) -> float:
    """--num-gpus, or its default for a cluster with `cluster_gpus` GPUs; GPUs asked of
    a cluster without any are refused (no replica could ever be placed)."""
    if requested is None:
        return default_gpus(cluster_gpus)
    if requested > 0 and cluster_gpus <= 0:
        raise ConfigError([f"--num-gpus {requested:g} asks for GPUs per replica, and the Ray "
                           "cluster has none. Fix: give --num-gpus 0 to serve on CPUs, or "
                           "serve on a cluster with GPUs (set RAY_ADDRESS)."])
    return requested


def autoscaling_config(args: argparse.Namespace) -> dict | None:
    """Serve's autoscaling config from the flags; None for a fixed replica count."""
    if args.max_replicas is None:
        return None
    if args.min_replicas > args.max_replicas:
        raise ConfigError([f"--min-replicas {args.min_replicas} is above --max-replicas "
                           f"{args.max_replicas}. Fix: lower it, or raise --max-replicas."])
    if args.replicas != 1:
        raise ConfigError(["--replicas fixes the replica count, --max-replicas autoscales it. "
                           "Fix: give one of them."])
    return {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests}


def serving_tracking_uri(args: argparse.Namespace, source) -> str | None:
    """Where --mlflow logs: --tracking-uri, the source run's store, $MLFLOW_TRACKING_URI."""
    if not args.mlflow:
        return None
    uri = args.tracking_uri or source.mlflow_run()[0] or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(["--mlflow: no tracking server is known for this model. Fix: give "
                           "--tracking-uri, or set MLFLOW_TRACKING_URI."])
    return uri


def engine_limits(args: argparse.Namespace) -> EngineLimits:
    """The replica's engine from the flags; a budget no step can prefill in is refused."""
    try:
        return EngineLimits(args.max_num_seqs, args.max_model_len, args.token_budget)
    except ValueError as problem:
        raise ConfigError([f"{problem}. Fix: raise --token-budget or lower --max-num-seqs."]
                          ) from None


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key or $RAYTRON_API_KEY; refused when empty, and when missing for a --host
    that other machines reach, unless --allow-unauthenticated."""
    try:
        key = checked_key(args.api_key, "--api-key") if args.api_key is not None else \
            checked_key(os.environ.get(API_KEY_VARIABLE))
    except ValueError as error:
        raise ConfigError([f"{error}."]) from None
    if key is None and not loopback(args.host) and not args.allow_unauthenticated:
        raise ConfigError([f"--host {args.host} lets other machines reach the server, and no "
                           f"API key is given. Fix: set ${API_KEY_VARIABLE} (and put TLS in "
                           "front), or give --allow-unauthenticated to serve anyone who "
                           "reaches it."])
    return key


def stop_on_terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_command(args: argparse.Namespace) -> int:
    from raytron.platform.models.sources import open_source

    engine = engine_limits(args)
    source = open_source(args.source)  # a SOURCE that holds no model fails before Ray
    if source.tokenizer is None:
        raise ConfigError([f"{args.source} has no tokenizer.json, which serving needs. Fix: "
                           "save the tokenizer beside the model."])
    address = os.environ.get("RAY_ADDRESS")
    address = None if address in ("", "local") else address  # Ray's "local": start one
    if args.detach and not address:
        raise ConfigError(["--detach leaves the application in a Ray cluster, and none is "
                           "given. Fix: `ray start --head`, then set RAY_ADDRESS=auto (or run "
                           "without --detach)."])
    autoscaling = autoscaling_config(args)
    tracking_uri = serving_tracking_uri(args, source)
    name = args.name or (source.run_dir or source.path).resolve().name
    adapters = adapter_settings(args, source)
    key = api_key(args)
    # A local Ray is this command's own, and so is the port: a Ray found on the machine
    # (another `raytron serve`'s, a training's) is never joined. A cluster's Serve may
    # hold the port already (the application is then replaced).
    problem = None if address else port_problem(args.host, args.port, key)
    if problem:
        raise ConfigError([problem])
    import ray
    from ray import serve

    from raytron.platform.serving.app import build_app
    from raytron.platform.serving.ingress import choose_local_ingress

    ingress = "" if address else f", behind {choose_local_ingress()}"
    print(f"Starting '{name}' on {'the cluster at ' + address if address else 'a local Ray'}"
          "...", flush=True)
    ray.init(address=address or "local", include_dashboard=False if not address else None,
             log_to_driver=False)
    # Serve's driver lines repeat what the line below says ("Connecting to existing Serve
    # app ... New http_options will not be applied": serve.run starts Serve again)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    gpus = replica_gpus(args.num_gpus, ray.cluster_resources().get("GPU", 0))
    serve.start(http_options={"host": args.host, "port": args.port})
    serve._run(build_app(str(Path(args.source).resolve()), name, key, engine,
                         args.replicas, autoscaling, tracking_uri, gpus,
                         Limits(args.max_queued, args.request_timeout_s), adapters),
               name=APP_NAME, route_prefix="/", _blocking=False)
    try:
        wait_until_running(lambda: serve.status().applications.get(APP_NAME),
                           args.start_timeout_s, lambda line: print(line, flush=True))
    except ServeStartFailed as failure:
        print(f"raytron: cannot serve: {failure}", file=sys.stderr, flush=True)
        stop(bool(address))
        return 1
    replicas = f"{args.min_replicas}-{args.max_replicas} (autoscaled)" if autoscaling \
        else str(args.replicas)
    device = f"{gpus:g} GPU each" if gpus else "on CPUs"
    print(f"Serving '{name}' ({source.describe()}) at http://{args.host}:{args.port}/v1 "
          f"with {replicas} replica(s), {device}{ingress}{served_adapters(name, adapters)}"
          f"{'; API key required' if key else ''}"
          f"{'; request metrics to MLflow' if tracking_uri else ''}.", flush=True)
    if args.detach:
        print(f"Left running in the cluster; stop it with `serve delete {APP_NAME}`.")
        return 0
    print("Ctrl-C stops it.", flush=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where it was ignored
    signal.signal(signal.SIGTERM, stop_on_terminate)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("Stopping.", file=sys.stderr)
    finally:
        stop(bool(address))
    return 0


def served_adapters(name: str, settings: AdapterSettings) -> str:
    """What the start line says of the adapters served."""
    said = [f"'{name}:{adapter}'" for adapter in settings.paths]
    if settings.directory:
        said.append(f"those of {settings.directory} as '{name}:NAME'")
    return f"; adapters {', '.join(said)}" if said else ""


def stop(in_a_cluster: bool) -> None:
    """The application deleted (its requests finish first); a local Ray then ends with
    this process. Not serve.shutdown(): the controller it kills reports the killing as
    a failed task on the console, and in a cluster it would stop every application."""
    from ray import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: no traceback mid-way
    serve.delete(APP_NAME)
    if not in_a_cluster:
        import ray

        ray.shutdown()
