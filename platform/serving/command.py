"""`raytron serve`: the serving application on a local Ray or the cluster's, in the
foreground (Ctrl-C stops it) or left running with --detach."""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from raytron.platform.config.schema import ConfigError
from raytron.platform.models.commands import SOURCE_HELP, checked

APP_NAME = "raytron"
API_KEY_VARIABLE = "RAYTRON_API_KEY"

SERVE_EPILOG = f"""\
Routes (OpenAI-compatible): POST /v1/completions, POST /v1/chat/completions (with the
model's chat template), GET /v1/models, GET /health. Fields: model, prompt (string or
list), messages, max_tokens, temperature, top_p, seed, stop, n, stream (server-sent
events). Concurrent requests are decoded together on each replica (--max-batch-size).

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "tiny", "prompt": "A class", "max_tokens": 20}}'

The API key may come from ${API_KEY_VARIABLE} instead of --api-key (which other users
of the machine can see in its process list). Ray: joins $RAY_ADDRESS when set, otherwise
starts a local Ray that lives as long as this command (--detach needs a cluster:
`ray start --head`). The application is importable for `serve run` and a KubeRay
RayService: raytron.platform.serving.app:build_app."""


def add_serve_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    command.add_argument("--name", metavar="NAME",
                         help="the model's name in requests (default: the run's or folder's "
                              "name)")
    command.add_argument("--replicas", type=checked(int, 1), default=1, metavar="N",
                         help="replicas of the model (default 1)")
    command.add_argument("--max-batch-size", type=checked(int, 1), default=8, metavar="B",
                         help="concurrent requests decoded together per replica (default 8)")
    command.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1: this machine only)")
    command.add_argument("--port", type=checked(int, 1, 65535), default=8000,
                         help="port to listen on (default 8000)")
    command.add_argument("--api-key", metavar="KEY",
                         help=f"require Authorization: Bearer KEY (or set ${API_KEY_VARIABLE})")
    command.add_argument("--detach", action="store_true",
                         help="leave the application running in the cluster and return")


def stop_on_terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_command(args: argparse.Namespace) -> int:
    from raytron.platform.models.sources import open_source

    source = open_source(args.source)  # a SOURCE that holds no model fails before Ray
    if source.tokenizer is None:
        raise ConfigError([f"{args.source} has no tokenizer.json, which serving needs. Fix: "
                           "save the tokenizer beside the model."])
    address = os.environ.get("RAY_ADDRESS")
    if args.detach and not address:
        raise ConfigError(["--detach leaves the application in a Ray cluster, and none is "
                           "given. Fix: `ray start --head`, then set RAY_ADDRESS=auto (or run "
                           "without --detach)."])
    name = args.name or (source.run_dir or source.path).resolve().name
    import ray
    from ray import serve

    from raytron.platform.serving.app import build_app

    ray.init(address=address, include_dashboard=False if not address else None,
             log_to_driver=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(str(Path(args.source).resolve()), name,
                        args.api_key or os.environ.get(API_KEY_VARIABLE), args.max_batch_size,
                        args.replicas), name=APP_NAME, route_prefix="/")
    print(f"Serving '{name}' ({source.describe()}) at http://{args.host}:{args.port}/v1 "
          f"with {args.replicas} replica(s){'; API key required' if args.api_key else ''}.",
          flush=True)
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
        serve.shutdown()
    return 0
