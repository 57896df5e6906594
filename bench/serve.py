"""Serving under load: `raytron serve`'s application with batching on and off.

    python bench/serve.py     # ~3 minutes on 2 cores; writes docs/benchmarks.md

One replica of the tiny model's shape (random weights: every request generates all its
tokens) on a local Ray; the load comes from this process, `REQUESTS` completions of
`NEW_TOKENS` tokens, temperature 0, sent through the official `openai` client by
1, 4 and 16 threads at once. Measured per concurrency: requests/s, output tokens/s,
p50 and p99 latency, and the time to the first token of streamed requests (a stream
decodes on its own, so this is the first token without batching). Batching off is the
same application with `max_batch_size=1`: requests wait their turn.
Target: output tokens/s at concurrency 16 at least 4x that at concurrency 1.
"""

from __future__ import annotations

import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # model_runs.py
from report import machine, markdown_table, write_section  # noqa: E402

REQUESTS, NEW_TOKENS, PROMPT = 64, 32, "The import statement finds a module and"
CONCURRENCY = (1, 4, 16)
STREAMED = 16  # streamed requests per concurrency, for the time to the first token


def free_port() -> int:
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


def load(client, concurrency: int) -> dict[str, float]:
    def complete(_: int) -> tuple[float, int]:
        started = time.perf_counter()
        response = client.completions.create(model="tiny", prompt=PROMPT,
                                             max_tokens=NEW_TOKENS, temperature=0)
        return time.perf_counter() - started, response.usage.completion_tokens

    def first_token(_: int) -> float:
        started = time.perf_counter()
        stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW_TOKENS,
                                           temperature=0, stream=True)
        first = None
        for _chunk in stream:
            first = first or time.perf_counter() - started
        return first

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(complete, range(concurrency)))  # warm-up
        started = time.perf_counter()
        results = list(pool.map(complete, range(REQUESTS)))
        elapsed = time.perf_counter() - started
        firsts = list(pool.map(first_token, range(STREAMED)))
    latencies = sorted(seconds for seconds, _ in results)
    return {"requests_s": REQUESTS / elapsed,
            "tokens_s": sum(tokens for _, tokens in results) / elapsed,
            "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
            "ttft": statistics.median(firsts)}


def main() -> None:
    import ray
    from openai import OpenAI
    from ray import serve

    from raytron.platform.serving.app import build_app

    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as folder:
        run_dir = tiny_run(Path(folder))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                        timeout=600)
        for batching, max_batch in (("on", 16), ("off", 1)):
            serve.run(build_app(str(run_dir), "tiny", max_batch_size=max_batch),
                      name="raytron", route_prefix="/")
            speeds = {}
            for concurrency in CONCURRENCY:
                result = load(client, concurrency)
                speeds[concurrency] = result["tokens_s"]
                rows.append([batching, str(concurrency), f"{result['requests_s']:.2f}",
                             f"{result['tokens_s']:.0f}",
                             f"{result['tokens_s'] / speeds[1]:.2f}x",
                             f"{result['p50'] * 1000:.0f}", f"{result['p99'] * 1000:.0f}",
                             f"{result['ttft'] * 1000:.0f}"])
                print(" | ".join(rows[-1]), flush=True)
            ratios[batching] = speeds[CONCURRENCY[-1]] / speeds[1]
        serve.shutdown()
        ray.shutdown()
    table = markdown_table(
        ["batching", "concurrency", "requests/s", "output tokens/s", "vs concurrency 1",
         "p50 latency (ms)", "p99 latency (ms)", "first token, streamed (ms, p50)"], rows)
    print(table)
    on_off = ratios["on"] / ratios["off"] if ratios["off"] else float("nan")
    write_section("serve", f"""## Serving (`bench/serve.py`)

`python bench/serve.py` on {machine()}. One replica of the tiny preset's shape (4 layers,
d_model 128, vocabulary 2048; random weights, fp32 on CPU) behind `raytron serve`'s
application on a local Ray (2 CPUs); {REQUESTS} completions of {NEW_TOKENS} new tokens
(temperature 0) sent by the official `openai` client from 1, 4 and 16 threads of the
same machine, which share its 2 cores with the replica. Batching on: `max_batch_size`
16; off: 1. The first-token column comes from {STREAMED} streamed requests, which decode
on their own. Target: output tokens/s at concurrency 16 at least 4x that at 1: measured
{ratios['on']:.2f}x with batching ({ratios['off']:.2f}x without, so batching is worth
{on_off:.1f}x at 16 concurrent requests).
A lone request waits up to Serve's `batch_wait_timeout_s` (10 ms) for others to
batch with, which is what batching costs at concurrency 1.

{table}
""")


if __name__ == "__main__":
    main()
