"""LoRA against a full fine-tune at the gpt2-124m shape, on this machine's CPU.

    python bench/lora.py    # ~5 minutes on 2 cores; writes docs/benchmarks.md

Each variant trains in a fresh process of its own (its peak resident memory is its
own): tokens/s (the median step after warm-up), the optimizer's state, and the peak
resident memory, each over the full fine-tune's measured in the same run.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # gloo.py
from report import machine, markdown_table, write_section  # noqa: E402

from raytron.pipelines.packing import Batch  # noqa: E402
from raytron.platform.config.layout import Layout  # noqa: E402
from raytron.platform.config.load import load_config  # noqa: E402
from raytron.platform.config.resolve import resolve_model  # noqa: E402
from raytron.platform.worker.hardware import memory_peaks  # noqa: E402
from raytron.platform.worker.trainer import Sequences, Trainer  # noqa: E402

from gloo import run_on_gloo  # noqa: E402

SHAPE = ["data.seq_len=256", "train.global_batch=4", "train.micro_batch=2"]
VOCAB, WARMUP, STEPS = 50257, 1, 4
VARIANTS = {
    "full fine-tune (baseline)": [],
    "LoRA r=16 on q,k,v,o,gate,up,down": ["train.lora.rank=16"],
    "LoRA r=16, embeddings and head trained too": ["train.lora.rank=16",
                                                   "train.lora.train_embeddings=true"],
}


def measure(overrides: list[str]) -> tuple[int, float, float, float]:
    """(trained parameters, tokens/s, optimizer state GB, peak resident GB)."""
    loaded = load_config("gpt2-124m", SHAPE + overrides)
    cfg = dataclasses.replace(loaded, model=resolve_model(loaded.model, VOCAB))
    trainer = Trainer(cfg, Layout(), torch.device("cpu"), None)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(WARMUP + STEPS):
        tokens = torch.randint(0, VOCAB, (cfg.train.global_batch, cfg.data.seq_len + 1),
                               generator=generator)
        started = time.perf_counter()
        trainer.train_step(Sequences.of(Batch.of(list(tokens.numpy())), torch.device("cpu")))
        times.append(time.perf_counter() - started)
    state = sum(t.numel() * t.element_size() for optimizer in trainer.optimizers
                for s in optimizer.state.values() for t in s.values() if t.dim())
    trained = sum(p.numel() for p in trainer.parameters() if p.requires_grad)
    speed = cfg.train.global_batch * cfg.data.seq_len / statistics.median(times[WARMUP:])
    return trained, speed, state / 1e9, memory_peaks(torch.device("cpu"))["peak"]


def main() -> None:
    rows, base = [], None
    for name, overrides in VARIANTS.items():
        trained, speed, state, peak = run_on_gloo(1, measure, overrides)
        base = base or (speed, state, peak)
        rows.append([name, f"{trained / 1e6:.2f}M", f"{speed:,.0f}", f"{speed / base[0]:.2f}",
                     f"{state:.3f}", f"{state / base[1]:.3f}", f"{peak:.2f}",
                     f"{peak / base[2]:.2f}"])
    table = markdown_table(["variant", "trained", "tokens/s", "÷ full", "AdamW state GB",
                            "÷ full", "peak RSS GB", "÷ full"], rows)
    body = f"""## LoRA against a full fine-tune (`bench/lora.py`)

`python bench/lora.py` on {machine()}: the gpt2-124m shape (12 x 768, 50k vocabulary,
124M weights), fp32, micro-batches of 2 x 256 tokens, global batch 4, one process per
variant; tokens/s is the median of {STEPS} steps after {WARMUP} of warm-up.

{table}

The frozen base keeps its fp32 weights (0.5 GB) and nothing else: no gradients and no
AdamW moments (1.5 GB for the whole model). Its backward pass still computes the
activations' gradients through every layer, and skips only the weights' own.
"""
    print(body)
    write_section("lora", body)


if __name__ == "__main__":
    main()
