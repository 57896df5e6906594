"""Throughput of the data pipeline, and how long training waits for it.

    python bench/data.py [CORPUS]   # ~4 minutes on 2 cores; writes docs/benchmarks.md

CORPUS is a folder of text files; the default is the complete works of Shakespeare (39
files, 4.6 MB) that this project's machines keep beside the repository.

1. Tokens/s of the Ray Data pipeline (read -> tokenize in actors -> pack -> global
   batches, through the DataFeeder) on the Shakespeare corpus, over tokens/s of
   Hugging Face `tokenizers`' `encode_batch` in one process on the same text (the median
   of 5): the first pass, which tokenizes and writes the token cache, with one and two
   tokenizer actors, and an epoch read from the cache.
2. The input wait of a `raytron train` run of the tiny preset: the time a step waited
   for its batch, as a share of the step time, after the first step.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from raytron.pipelines.feeder import DataFeeder  # noqa: E402
from raytron.pipelines.stream import ALL, local_texts  # noqa: E402
from raytron.pipelines.tokenizer import train_bpe  # noqa: E402
from raytron.platform.config.load import load_config  # noqa: E402
from raytron.platform.control.corpus import stream_spec, with_tokenizer  # noqa: E402
from raytron.platform.storage import metric_names as names  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "shakespeare"
SEQ_LEN, GLOBAL_BATCH = 512, 32


def baseline(tokenizer, texts: list[str], fast: bool = False, per_file: bool = False) -> float:
    """Tokens/s of one `encode_batch` (or `encode_batch_fast`, without character offsets)
    of the whole corpus, or of one file a call (one core), the median of 5."""
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch
    batches = [[text] for text in texts] if per_file else [texts]
    rates = []
    for _ in range(5):
        started = time.perf_counter()
        encoded = [e for batch in batches for e in encode(batch, add_special_tokens=False)]
        rates.append(sum(len(e.ids) + 1 for e in encoded) / (time.perf_counter() - started))
    return statistics.median(rates)


def pipeline(spec, tokens_in_corpus: int) -> tuple[float, float]:
    """Tokens/s through the DataFeeder for one epoch: from seek (start-up included), and
    after the first batch."""
    import ray

    feeder = ray.remote(DataFeeder).options(num_cpus=0, max_concurrency=8).remote(
        spec, SEQ_LEN, GLOBAL_BATCH, 1000, 1)
    steps = tokens_in_corpus // (SEQ_LEN * GLOBAL_BATCH)
    started = time.perf_counter()
    ray.get(feeder.seek.remote(0, {}))
    ray.get(feeder.batch.remote(0, 0, 1))
    first = time.perf_counter()
    for step in range(1, steps):
        ray.get(feeder.batch.remote(step, 0, 1))
    done = time.perf_counter()
    ray.kill(feeder)
    tokens = SEQ_LEN * GLOBAL_BATCH
    return steps * tokens / (done - started), (steps - 1) * tokens / (done - first)


def input_wait() -> tuple[float, float, float]:
    """Median and worst input wait over step time of `raytron train tiny`, after step 1."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as root:
        subprocess.run([sys.executable, "-m", "raytron.platform.cli", "train", "tiny",
                        f"run.root={root}", "run.name=bench", "train.steps=100",
                        "train.log_interval=1"], check=True, capture_output=True, cwd=root)
        client = MlflowClient(f"sqlite:///{root}/mlflow.db")
        run_id = Path(root, "bench", "mlflow_run_id").read_text().strip()
        waits = {m.step: m.value for m in client.get_metric_history(run_id, names.INPUT_WAIT_S)}
        times = {m.step: m.value for m in client.get_metric_history(run_id, names.STEP_TIME_S)}
    shares = [waits[s] / times[s] for s in waits if s > 1]
    return statistics.median(shares), max(shares), statistics.median(times.values())


def main() -> None:
    import ray

    corpus = Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS
    config = load_config("tiny", [f"data.sources=[{corpus}]", "data.val_share=0"])
    spec = stream_spec(config)
    texts = list(local_texts(spec.sources[0], ALL, 0.0))
    tokenizer = train_bpe(texts, 8192, show_progress=False)
    reference = baseline(tokenizer, texts)
    corpus_tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(texts))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = [["`tokenizers` encode_batch, one process (baseline)", f"{reference:,.0f}", "1.00",
             "1.00", ""]]
    for name, fast in (("one process", baseline(tokenizer, texts, fast=True)),
                       ("one file a call (one core: one actor's bound)",
                        baseline(tokenizer, texts, fast=True, per_file=True))):
        rows.append([f"`tokenizers` encode_batch_fast (no offsets), {name}", f"{fast:,.0f}",
                     f"{fast / reference:.2f}", f"{fast / reference:.2f}", ""])
    cache = tempfile.mkdtemp(prefix="token_cache-")
    for workers in (1, 2):
        spec_w = with_tokenizer(stream_spec(load_config("tiny", [
            f"data.sources=[{corpus}]", "data.val_share=0",
            f"data.tokenizer_workers={workers}"])), tokenizer)
        spec_w = dataclasses.replace(spec_w, cache=f"{cache}/{workers}")  # a cold cache each
        whole, first = pipeline(spec_w, corpus_tokens)
        rows.append([f"raytron first pass (tokenizes, writes the cache), {workers} tokenizer "
                     "actor(s)", f"{first:,.0f}", f"{first / reference:.2f}",
                     f"{whole / reference:.2f}", ">= 0.90"])
    whole, cached = pipeline(spec_w, corpus_tokens)  # the cache the two actors wrote
    rows.append(["raytron cached epoch (reads the cache)", f"{cached:,.0f}",
                 f"{cached / reference:.2f}", f"{whole / reference:.2f}",
                 ">= 5x the first pass"])
    ray.shutdown()
    shutil.rmtree(cache)
    median_wait, worst_wait, step_time = input_wait()
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    body = f"""## Data pipeline (`bench/data.py`)

`python bench/data.py` on {machine()}. Corpus: `{corpus.name}/` ({len(texts)} files,
{megabytes:.1f} MB, {corpus_tokens:,} tokens with an 8192-token BPE), one epoch, sequences of
{SEQ_LEN}, global batches of {GLOBAL_BATCH}.

{markdown_table(["reader", "tokens/s (after the first batch)", "ratio",
                 "ratio with start-up", "target"], rows)}

`encode_batch` tokenizes with Rust threads on every core of the process; the pipeline
reads, tokenizes in Ray actors (one CPU each, one file a call, with `encode_batch_fast`:
the ids without the character offsets `encode_batch` also computes), moves the tokens
through the object store and packs them into global batches in the DataFeeder, on the
same two cores. The first pass also writes each file's tokens to the token cache
(`data.cache`); the cached epoch, a new DataFeeder over the same cache, reads them back
without any tokenizer actor: {cached / first:.1f}x the first pass with two actors. A
document here is a whole play, which one tokenizer call encodes on one core: one actor
is bound by a core's rate (the third row), two use both cores. Start-up (the
DataFeeder's process, and the tokenizer actors' on a first pass) is the rest of the
last column.

Input wait of `raytron train tiny` (100 steps, {1e3 * step_time:.0f} ms per step):
median {100 * median_wait:.2f}% of the step time after step 1, worst {100 * worst_wait:.2f}%
(target: below 1%).
"""
    print(body)
    write_section("data", body)


if __name__ == "__main__":
    main()
