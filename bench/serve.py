"""Serving under load: `raytron serve`'s engine against `transformers serve`.

    python bench/serve.py          # ~7 minutes on 2 cores; writes docs/benchmarks.md
    python bench/serve.py --quick  # a few requests per load, a trial: writes nothing

The tiny model's shape (random weights: every request generates all its tokens) as a run
directory, and the same weights exported by `raytron export` (fp32). Each server runs
alone, as users start it: `raytron serve RUN --max-num-seqs 64` (a local Ray of its
own, HAProxy on the port), the same with Serve's Python proxy, then `transformers serve
--continuous-batching --device cpu --dtype float32 OUT`; all with OMP_NUM_THREADS=1. The load
comes from another process (`--client`), the official `openai` client on asyncio: closed
loops of 1, 4, 16 and 64 concurrent requests, then Poisson arrivals at a fixed rate (a
fraction of raytron's requests/s at concurrency 16, the same rate for both servers).
Every request streams `NEW_TOKENS` tokens of one prompt, temperature 0; measured per
request: time to the first text chunk (TTFT), the gaps between chunks (inter-token
latency, ITL) and the whole request; per load: output tokens/s (all tokens / elapsed).
Targets (issue 23): tokens/s at concurrency 16 at least 8x that at 1; TTFT p50 at 16
under 100 ms; at least 1.5x `transformers serve`'s tokens/s at 16.
`transformers serve` needs accelerate (`pip install 'transformers[serving]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # model_runs.py
from report import machine, markdown_table, write_section  # noqa: E402

NEW_TOKENS, PROMPT = 32, "The import statement finds a module and"
CONCURRENCY = (1, 4, 16, 64)
THREADS = 1  # torch threads of each server (OMP_NUM_THREADS): 2 were slower for both
PYTHON_PROXY = "raytron serve, Serve's proxy"  # RAY_SERVE_ENABLE_HA_PROXY=0
MAX_NUM_SEQS = 64
POISSON_REQUESTS, RATE_FRACTION = 64, 0.9
STARTUP_S = 300
PREVIOUS = """The previous implementation (`@serve.batch`, `max_batch_size` 16, measured
2026-11-24 at an older commit by the earlier version of this bench, non-streamed
requests from threads of the server's own process; not re-measured): 462 / 1449 /
1848 output tokens/s at concurrency 1 / 4 / 16, streamed TTFT p50 at 16: 665 ms.

Torch threads (a `--quick` run of this bench on 2026-12-05, through Serve's proxy, not
re-measured): with OMP_NUM_THREADS=2, 963 tokens/s at concurrency 16 for raytron and
1768 for `transformers serve`; with 1, 1594 and 2404."""


def requests_for(concurrency: int, quick: bool) -> int:
    """Enough requests that each closed loop runs several rounds."""
    return 2 * concurrency if quick else max(128, 6 * concurrency)


# --- the client (its own process) ---


async def stream_one(client, model: str) -> dict:
    """One streamed request: when each text chunk came, and its output tokens."""
    started = time.perf_counter()
    stamps, usage, reason = [], None, None
    stream = await client.completions.create(
        model=model, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        usage = chunk.usage.completion_tokens if chunk.usage else usage
        for choice in chunk.choices:
            if choice.text:
                stamps.append(time.perf_counter())
            reason = choice.finish_reason or reason
    # a server that sends no usage (transformers serve): max_tokens when it says so
    tokens = usage or (NEW_TOKENS if reason == "length" else len(stamps))
    return {"ttft": stamps[0] - started, "latency": time.perf_counter() - started,
            "gaps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(results: list[dict], elapsed: float) -> dict:
    gaps = [gap for result in results for gap in result["gaps"]]
    out = {"requests": len(results), "elapsed": elapsed,
           "tokens": sum(r["tokens"] for r in results),
           "tokens_per_request": sorted({r["tokens"] for r in results}),
           "requests_s": len(results) / elapsed}
    out["tokens_s"] = out["tokens"] / elapsed
    for name, values in (("ttft", [r["ttft"] for r in results]), ("itl", gaps),
                         ("latency", [r["latency"] for r in results])):
        out[f"{name}_p50"], out[f"{name}_p99"] = percentile(values, .5), percentile(values, .99)
    return out


async def closed_loop(client, model: str, concurrency: int, total: int) -> dict:
    """`concurrency` requests in flight until `total` are done; one round of warm-up."""
    await asyncio.gather(*(stream_one(client, model) for _ in range(concurrency)))
    pending, results = iter(range(total)), []

    async def worker() -> None:
        for _ in pending:  # one iterator shared by the workers
            results.append(await stream_one(client, model))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summary(results, time.perf_counter() - started)


async def poisson(client, model: str, rate: float, total: int) -> dict:
    """`total` requests with exponential gaps (mean 1 / `rate` s), each in flight at once."""
    gaps, tasks = random.Random(0), []
    started = time.perf_counter()
    for _ in range(total):
        tasks.append(asyncio.create_task(stream_one(client, model)))
        await asyncio.sleep(gaps.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return summary(list(results), time.perf_counter() - started)


async def client_main(url: str, model: str, rate: float | None, quick: bool) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    loads = {}
    for concurrency in CONCURRENCY:
        loads[f"concurrency {concurrency}"] = await closed_loop(
            client, model, concurrency, requests_for(concurrency, quick))
        print(f"concurrency {concurrency}: {loads[f'concurrency {concurrency}']['tokens_s']:.0f}"
              " tok/s", file=sys.stderr, flush=True)
    rate = rate or round(RATE_FRACTION * loads["concurrency 16"]["requests_s"], 1)
    loads[f"Poisson {rate:g} req/s"] = await poisson(
        client, model, rate, 16 if quick else POISSON_REQUESTS)
    used = resource.getrusage(resource.RUSAGE_SELF)
    return {"loads": loads, "rate": rate, "client_cpu_s": used.ru_utime + used.ru_stime}


# --- the servers (one at a time) ---


class ServerFailed(RuntimeError):
    """A server that exited or never answered /health: why, in its own words."""


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and its live descendants (Ray's workers are among them)."""
    parents, times = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK")
    family, total = {root}, 0.0
    for pid in sorted(parents):  # children have higher ids than parents, mostly
        if pid in family or parents[pid] in family:
            family.add(pid)
            total += times.get(pid, 0.0)
    return total


def wait_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + STARTUP_S
    while time.time() < deadline:
        if server.poll() is not None:
            raise ServerFailed(f"exited with {server.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise ServerFailed(f"no answer on /health after {STARTUP_S} s:\n{tail(log)}")


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop(server: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it; the server alone (its Ray shuts down its own)."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def ray_threads() -> str:
    """Torch threads in the replica of the newest local Ray (this bench's server's)."""
    probe = subprocess.run([sys.executable, __file__, "--probe-ray"], capture_output=True,
                           text=True, timeout=120)
    return probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 else \
        f"unknown ({probe.stderr.strip().splitlines()[-1:]})"


def probe_ray() -> None:
    import ray

    def threads(_replica) -> str:
        import torch
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"

    ray.init(address="auto", log_to_driver=False)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "ModelServer" in actor["name"]:
            replica = ray.get_actor(actor["name"], namespace=actor["namespace"])
            print(ray.get(replica.__ray_call__.remote(threads)))


def measure(name: str, command: list[str], model: str, port: int, folder: Path,
            rate: float | None, quick: bool, environment: dict | None = None) -> dict:
    """Start the server (`environment` added to its own), load it from a client process,
    stop it: the client's results, the server's torch threads and the cores it used
    meanwhile."""
    url, log = f"http://127.0.0.1:{port}", folder / f"{name.split()[0]}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           **(environment or {})}
    print(f"{name}: {' '.join(command)}", flush=True)
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    try:
        wait_healthy(url, server, log)
        threads = ray_threads() if name.startswith("raytron") else \
            f"{THREADS} (OMP_NUM_THREADS={THREADS})"
        cpu, started = tree_cpu_s(server.pid), time.perf_counter()
        client = subprocess.run(
            [sys.executable, __file__, "--client", url, "--model", model,
             *(["--rate", str(rate)] if rate else []), *(["--quick"] if quick else [])],
            stdout=subprocess.PIPE, text=True, env=env, check=True)
        wall = time.perf_counter() - started
        result = json.loads(client.stdout.strip().splitlines()[-1])
        result.update(threads=threads, server_cores=(tree_cpu_s(server.pid) - cpu) / wall,
                      client_cores=result["client_cpu_s"] / wall)
        return result
    finally:
        stop(server)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_run(root: Path) -> Path:
    from raytron.model.gpt import GPT, GPTShape

    from model_runs import small_tokenizer, write_run

    tokenizer = small_tokenizer(2048)
    shape = GPTShape(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, ffn_hidden=384,
                     vocab_size=2048, max_seq_len=256, tie_embeddings=False)
    return write_run(root, "tiny", GPT(shape, seed=0).eval(), tokenizer)


def tool(name: str) -> str:
    """A command of this Python's environment."""
    return str(Path(sys.executable).parent / name)


def exported(run_dir: Path, out: Path) -> Path:
    subprocess.run([tool("raytron"), "export", str(run_dir), str(out)], check=True,
                   capture_output=True)
    return out


# --- the report ---


def rows_of(server: str, result: dict) -> list[list[str]]:
    single = result["loads"]["concurrency 1"]["tokens_s"]
    return [[server, load, str(r["requests"]), f"{r['tokens_s']:.0f}",
             f"{r['tokens_s'] / single:.2f}x" if load.startswith("concurrency") else "-"] +
            [f"{r[key] * 1000:.1f}" for key in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99",
                                                "latency_p50", "latency_p99")]
            for load, r in result["loads"].items()]


def verdict(met: bool) -> str:
    return "**met**" if met else "**not met**"


def targets(ours: dict, theirs: dict | None) -> str:
    loads = ours["loads"]
    scaling = loads["concurrency 16"]["tokens_s"] / loads["concurrency 1"]["tokens_s"]
    ttft = loads["concurrency 16"]["ttft_p50"] * 1000
    lines = [f"- output tokens/s at concurrency 16 at least 8x that at 1: {scaling:.2f}x, "
             f"{verdict(scaling >= 8)}",
             f"- streamed TTFT p50 at concurrency 16 under 100 ms: {ttft:.1f} ms, "
             f"{verdict(ttft < 100)}"]
    if theirs is None:
        lines.append("- at least 1.5x `transformers serve`'s tokens/s at concurrency 16: "
                     "not measured (it did not serve, above)")
    else:
        ratio = loads["concurrency 16"]["tokens_s"] / \
            theirs["loads"]["concurrency 16"]["tokens_s"]
        lines.append(f"- at least 1.5x `transformers serve`'s tokens/s at concurrency 16: "
                     f"{ratio:.2f}x, {verdict(ratio >= 1.5)}")
    return "\n".join(lines)


def cores(name: str, result: dict) -> str:
    return (f"{name}: torch threads {result['threads']}; the server's processes used "
            f"{result['server_cores']:.2f} cores and the client {result['client_cores']:.2f} "
            "over the whole load")


def write_report(ours: dict, proxied: dict, theirs: dict | None, failure: str | None,
                 hf_version: str, table: str) -> None:
    hf_line = cores("transformers serve", theirs) if theirs else \
        f"`transformers serve` failed:\n\n```\n{failure}\n```"
    write_section("serve", f"""## Serving (`bench/serve.py`)

`python bench/serve.py` on {machine()}, transformers {hf_version}. The tiny preset's
shape (4 layers, d_model 128, vocabulary 2048; random weights, fp32 on CPU), one server
alone at a time: `raytron serve RUN --max-num-seqs {MAX_NUM_SEQS}` (one replica on the
local Ray it starts, 2 CPUs, HAProxy on the port: Ray Serve's high-throughput mode),
the same with Serve's Python proxy instead (`RAY_SERVE_ENABLE_HA_PROXY=0`), then
`transformers serve --continuous-batching --device cpu --dtype float32` on the same
weights exported by `raytron export`; OMP_NUM_THREADS={THREADS} for all (two torch
threads were slower for both servers: the HTTP side and the client need the other
core). The load comes from a process of its own on the same 2 cores: the official
`openai` client (asyncio), every request streamed, {NEW_TOKENS} new tokens of one prompt,
temperature 0; closed loops of 1, 4, 16 and 64 requests in flight (after a round of
warm-up), then {POISSON_REQUESTS} requests arriving as a Poisson process at
{RATE_FRACTION:g}x raytron's requests/s at concurrency 16, the same rate for both.
TTFT: to the first text chunk; ITL: the gaps between a request's chunks (a chunk is a
token here); latency: the whole request; tokens/s: all output tokens / elapsed.
`transformers serve` needs accelerate (`pip install 'transformers[serving]'`), which
raytron's extras do not install.

{cores("raytron serve", ours)}.
{cores(PYTHON_PROXY, proxied)}.
{hf_line}.

{table}

Targets (issue 23):
{targets(ours, theirs)}

{PREVIOUS}
""")


def main(quick: bool) -> None:
    import transformers

    servers = {}
    failure = None
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        run_dir = tiny_run(root)
        hf_dir = exported(run_dir, root / "hf")
        port = free_port()
        raytron = [tool("raytron"), "serve", str(run_dir), "--port", str(port),
                   "--max-num-seqs", str(MAX_NUM_SEQS)]
        servers["raytron serve"] = measure("raytron serve", raytron, "tiny", port, root,
                                           None, quick)
        servers[PYTHON_PROXY] = measure(PYTHON_PROXY, raytron, "tiny", port, root,
                                        servers["raytron serve"]["rate"], quick,
                                        {"RAY_SERVE_ENABLE_HA_PROXY": "0"})
        try:  # its model answers to the folder it was given (its /v1/models lists none)
            servers["transformers serve"] = measure(
                "transformers serve", [tool("transformers"), "serve", "--continuous-batching",
                                       "--device", "cpu", "--dtype", "float32", "--port",
                                       str(port), str(hf_dir)],
                str(hf_dir), port, root, servers["raytron serve"]["rate"], quick)
        except (ServerFailed, subprocess.CalledProcessError) as problem:
            failure = str(problem)
            print(f"transformers serve failed: {failure}", flush=True)
    rows = [row for name, result in servers.items() for row in rows_of(name, result)]
    table = markdown_table(
        ["server", "load", "requests", "output tokens/s", "vs concurrency 1",
         "TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)", "ITL p99 (ms)",
         "latency p50 (ms)", "latency p99 (ms)"], rows)
    print(table)
    for name, result in servers.items():
        print(cores(name, result), "; tokens per request:",
              {load: r["tokens_per_request"] for load, r in result["loads"].items()})
    print(targets(servers["raytron serve"], servers.get("transformers serve")))
    if not quick:
        write_report(servers["raytron serve"], servers[PYTHON_PROXY],
                     servers.get("transformers serve"), failure, transformers.__version__,
                     table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", metavar="URL", help="be the load: print JSON results")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rate", type=float, help="Poisson arrivals per second")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--probe-ray", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client_main(args.client, args.model, args.rate,
                                                 args.quick))))
    elif args.probe_ray:
        probe_ray()
    else:
        main(args.quick)
