"""Memory of a document-masked fine-tuning step: SDPA's math kernel (what CUDA ran for
every masked attention before `model/attention.py`) against the path chosen now.

    python bench/attention.py     # ~35 s on 2 cores; writes docs/benchmarks.md

A llama-like GPT small enough for 2 cores (4 layers, d_model 512, 8 heads sharing 2
key/value heads), one sequence of 2048 tokens packing samples of several lengths,
forward, loss and backward of one step in fp32. Each variant runs in a process of its
own; its peak is the process's peak resident memory (`ru_maxrss`) less its resident
memory just before the step (the model and its inputs built), best of the repeats.
On CPU the chosen path is SDPA with the dense bool mask (the CPU's flash kernel);
on CUDA it is FlexAttention, which CPU cannot train with (it has no backward there).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from raytron.model.gpt import GPT, GPTShape, cross_entropy  # noqa: E402

THREADS = 2
REPEATS = 3
SEQ = 2048
SAMPLES = [300, 700, 48, 1000]  # tokens of each packed sample: SEQ in all
SHAPE = GPTShape(n_layers=4, d_model=512, n_heads=8, n_kv_heads=2, ffn_hidden=1536,
                 vocab_size=4096, max_seq_len=SEQ)
VARIANTS = {  # name: what runs
    "math": "SDPA's math kernel with the dense mask (CUDA before)",
    "chosen": "the chosen path (CPU: SDPA's flash kernel with the dense mask)",
    "causal": "no document mask, causal (pre-training), for scale",
}


def resident_mb() -> float:
    """The process's resident memory now (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_step(variant: str) -> dict:
    """One forward and backward of the model in this process."""
    torch.set_num_threads(THREADS)
    model = GPT(SHAPE, seed=0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPE.vocab_size, (1, SEQ + 1), generator=generator)
    positions = torch.cat([torch.arange(n) for n in SAMPLES])[None]
    kwargs = {} if variant == "causal" else {"positions": positions}
    before = resident_mb()
    started = time.perf_counter()
    if variant == "math":
        with sdpa_kernel(SDPBackend.MATH):
            loss = cross_entropy(model(tokens[:, :-1], **kwargs), tokens[:, 1:])
            loss.backward()
    else:
        loss = cross_entropy(model(tokens[:, :-1], **kwargs), tokens[:, 1:])
        loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak, "step_mb": peak - before, "seconds": seconds,
            "loss": loss.item()}


def measure(variant: str) -> dict:
    runs = []
    for _ in range(REPEATS):
        out = subprocess.run([sys.executable, __file__, variant], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout))
    return min(runs, key=lambda run: run["step_mb"])


def main() -> None:
    results = {variant: measure(variant) for variant in VARIANTS}
    base = results["math"]
    if abs(results["chosen"]["loss"] - base["loss"]) > 1e-4 * abs(base["loss"]):
        raise SystemExit(f"the chosen path's loss {results['chosen']['loss']} is not the "
                         f"math kernel's {base['loss']}")
    rows = [[VARIANTS[variant], f"{r['peak_mb']:.0f}", f"{r['step_mb']:.0f}",
             f"{r['step_mb'] / base['step_mb']:.2f}x", f"{r['seconds']:.1f}",
             f"{r['seconds'] / base['seconds']:.2f}x", f"{r['loss']:.5f}"]
            for variant, r in results.items()]
    table = markdown_table(["attention", "peak RSS (MB)", "step's peak (MB)",
                            "vs math", "step (s)", "vs math", "loss"], rows)
    print(table)
    sizes = " + ".join(map(str, SAMPLES))
    write_section("attention", f"""## Masked attention memory (`bench/attention.py`)

`python bench/attention.py` on {machine()}; {THREADS} torch threads, fp32. One
fine-tuning step (forward, loss, backward) of a llama-like GPT ({SHAPE.n_layers} layers,
d_model {SHAPE.d_model}, {SHAPE.n_heads} heads sharing {SHAPE.n_kv_heads} key/value
heads, vocabulary {SHAPE.vocab_size}) on one sequence of {SEQ} tokens packing samples of
{sizes} tokens, each attending only within itself. Each variant runs in a process of
its own, best of {REPEATS}; the step's peak is the process's peak resident memory less
its resident memory just before the step. "math" is what CUDA ran for a masked
attention before `model/attention.py` (flash takes no mask, memory-efficient no
grouped heads): it holds a (batch, heads, seq, seq) fp32 score tensor per layer. On
CUDA the chosen path is FlexAttention, which has no backward on CPU and is not measured
here.

{table}
""")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(run_step(sys.argv[1])))
    else:
        main()
