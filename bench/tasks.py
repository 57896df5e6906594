"""Scoring lm-evaluation-harness tasks: raytron in process and through `raytron serve`,
against lm_eval's own `hf` model on the export.

    python bench/tasks.py          # ~10 minutes on 2 cores; writes docs/benchmarks.md
    python bench/tasks.py --quick  # a few samples, a trial: writes nothing

raytron's four shipped tasks (raytron_word_choice: a paragraph and 4 words that may end
it; raytron_last_sentence: a paragraph and 4 sentences that may end it;
raytron_next_line: a line and 4 lines that may follow it; raytron_last_word: one
continuation) on random weights of two shapes, a run directory and the same weights
exported by `raytron export` (fp32, CPU): each task timed once with (a) lm_eval's
`raytron` model in this process, (b) lm_eval's `hf` model on the export, (c) lm_eval's
`local-completions` model against `raytron serve` on the run (started for it, one torch
thread as in bench/serve.py, 8 requests in flight). The same batch size for (a) and (b).
Target (issue 24): in process at least 1.5x `hf`'s speed, with the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # model_runs.py
from report import machine, markdown_table, write_section  # noqa: E402
from serve import exported, free_port, stop, tool, wait_healthy  # noqa: E402

TASKS = ["raytron_word_choice", "raytron_last_sentence", "raytron_next_line",
         "raytron_last_word"]
BATCH = 16
CONCURRENT = 8
SHAPES = {  # name: (shape arguments, vocabulary, samples of each task)
    "tiny (1.3M)": (dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, ffn_hidden=384,
                         max_seq_len=256, tie_embeddings=False), 2048, None),
    # the gpt2-124m preset's vocabulary (its tokenizer here has 4,096 tokens of them)
    "gpt2-124m shape (124M)": (dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12,
                                    ffn_hidden=2048, max_seq_len=512), 50304, 60),
}
TOKENIZER_VOCAB = 4096  # at most: a BPE trained on the Python reference's text


def run_of(root: Path, name: str, arguments: dict, vocab: int) -> Path:
    from raytron.model.gpt import GPT, GPTShape

    from model_runs import small_tokenizer, write_run

    shape = GPTShape(vocab_size=vocab, **arguments)
    return write_run(root, name, GPT(shape, seed=0).eval(),
                     small_tokenizer(min(vocab, TOKENIZER_VOCAB)))


def timed(model, task: str, limit: int | None) -> tuple[float, dict]:
    """The seconds the model spent answering lm_eval's requests of `task` (building the
    task and its prompts, the same for every model, left out), and lm_eval's results."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from raytron.platform.models.task_eval import raytron_tasks

    spent = [0.0]
    answer = model.loglikelihood

    def loglikelihood(requests, *args, **kwargs):
        started = time.perf_counter()
        try:
            return answer(requests, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    model.loglikelihood = loglikelihood  # what the tasks ask (an instance's own)
    try:
        results = simple_evaluate(model=model, tasks=[task], limit=limit, log_samples=True,
                                  task_manager=TaskManager(include_path=str(raytron_tasks())))
    finally:
        model.loglikelihood = answer
    return spent[0], results


@contextlib.contextmanager
def served(run_dir: Path, context: int, folder: Path):
    """lm_eval's client of `raytron serve`, serving the run for the block."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    port, log = free_port(), folder / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as out:
        server = subprocess.Popen([tool("raytron"), "serve", str(run_dir), "--port",
                                   str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, log)
        yield LocalCompletionsAPI(
            model=run_dir.name, base_url=f"http://127.0.0.1:{port}/v1/completions",
            tokenizer_backend="remote", tokenized_requests=True, max_length=context,
            num_concurrent=CONCURRENT)
    finally:
        stop(server)


def largest_gap(ours: dict, theirs: dict, task: str) -> float:
    """The largest difference between the two's log-likelihoods, request by request."""
    def scores(results: dict) -> list[float]:
        return [float(response[0][0])
                for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])
                for response in sample["resps"]]
    return max(abs(a - b) for a, b in zip(scores(ours), scores(theirs), strict=True))


def accuracy(results: dict, task: str) -> str:
    return f"{results['results'][task]['acc,none']:.3f}"


def main(quick: bool) -> None:
    import torch
    from lm_eval.models.huggingface import HFLM

    from raytron.platform.models import load_model
    from raytron.platform.models.harness import RaytronLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for name, (arguments, vocab, limit) in SHAPES.items():
            limit = 4 if quick else limit
            run_dir = run_of(root, name.split()[0], arguments, vocab)
            hf_dir = exported(run_dir, root / f"{run_dir.name}-hf")
            ours_model = RaytronLM(load_model(run_dir), batch_size=BATCH)
            hf_model = HFLM(pretrained=str(hf_dir), batch_size=BATCH, device="cpu",
                            dtype="float32")
            # the server's prompt holds one token less (it generates one): compared with
            # a model in process keeping as many
            context = arguments["max_seq_len"]
            alike_model = RaytronLM(load_model(run_dir), batch_size=BATCH,
                                    max_length=context - 2)
            with served(run_dir, context, root) as server:
                for task in TASKS:
                    ours_s, ours = timed(ours_model, task, limit)
                    hf_s, hf = timed(hf_model, task, limit)
                    served_s, through = timed(server, task, limit)
                    _, alike = timed(alike_model, task, limit)
                    rows.append([name, task, str(ours["n-samples"][task]["effective"]),
                                 f"{ours_s:.1f}", f"{hf_s:.1f}", f"{hf_s / ours_s:.2f}x",
                                 f"{served_s:.1f}", f"{largest_gap(ours, hf, task):.1e}",
                                 f"{largest_gap(alike, through, task):.1e}",
                                 " / ".join(accuracy(r, task) for r in (ours, hf, through))])
                    print(rows[-1], flush=True)
    table = markdown_table(
        ["model", "task", "samples", "raytron in process (s)", "lm_eval hf (s)",
         "speed vs hf", "through raytron serve (s)", "largest gap vs hf",
         "largest gap, served", "accuracy: raytron / hf / served"], rows)
    print(table)
    if not quick:
        write_section("tasks", f"""## Scoring tasks (`bench/tasks.py`)

`python bench/tasks.py` on {machine()}; 2 torch threads in process, 1 in the server.
Times: the seconds each model spent answering lm_eval's log-likelihood requests (building
the tasks, the same for all, left out).
raytron's shipped tasks raytron_word_choice (a paragraph and 4 words that may end it: a
long shared context and short choices, as in MMLU or ARC), raytron_last_sentence (a
paragraph and 4 sentences that may end it: choices of many tokens, as in HellaSwag),
raytron_next_line (a line and 4 lines that may follow it: short contexts) and
raytron_last_word (one continuation), on random weights (all samples of each at the tiny
shape, the first {SHAPES["gpt2-124m shape (124M)"][2]} at the gpt2-124m shape, with that
preset's vocabulary of 50,304), timed once
each: lm_eval's `raytron` model in process, lm_eval's `hf` model on `raytron export`'s
folder (both batch {BATCH}), and lm_eval's `local-completions` against `raytron serve`
({CONCURRENT} requests in flight, tokenizing through the server). Gaps: the largest
difference of a request's log-likelihood (served: against raytron in process keeping the
tokens a server prompt keeps). Target (issue 24): in process at least 1.5x `hf`'s speed,
with the same numbers.

{table}

On a CPU both models are bound by the same matrix products, so speed comes from
computing less. raytron computes the output head (a matmul of the width by the
vocabulary: 31% of the gpt2-124m shape's work per position, 25% of the tiny one's) only
at the positions that predict a continuation, where lm_eval's `hf` model computes it,
and a log-softmax over the vocabulary, at every position; and it computes a context its
choices share once, into a KV cache each choice reads, where the choices are shorter
than the context (`hf` shares one only for choices of one token, its logits cache).
Hence the largest gain on raytron_last_sentence (long contexts, choices of many tokens)
and the least where the context is short and the continuations long
(raytron_next_line): there the head is needed at most positions and nothing is worth
sharing. Through the server, each choice is a request of its own and the context is
computed for each.
""")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
