"""The llama-1b preset on one GPU: tokens/s, MFU and peak memory, eager against compiled,
without recomputation against selective recomputation.

    python bench/gpu.py      # needs a CUDA GPU; ~10 minutes on an H100; writes docs/benchmarks.md

Each variant runs in a process of its own (a clean allocator peak and compile cache):
raytron's Trainer on one device, bf16 autocast with fp32 master weights and AdamW,
random tokens, micro-batches of 4 x 2048 tokens accumulated to a global batch of 16.
MFU is the model FLOPs of a step (`GPT.flops_per_token`, PaLM's 6N + 12LdT) over its
time and the GPU's data-sheet bf16 peak. The baseline is the eager run without
recomputation. Target: MFU >= 45% on an H100 with compile.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from raytron.model.gpt import GPT  # noqa: E402
from raytron.pipelines.packing import Batch  # noqa: E402
from raytron.platform.config.layout import Layout  # noqa: E402
from raytron.platform.config.load import load_config  # noqa: E402
from raytron.platform.config.resolve import gpt_shape, resolve_model  # noqa: E402
from raytron.platform.worker.hardware import memory_peaks, peak_flops  # noqa: E402
from raytron.platform.worker.trainer import Sequences, Trainer  # noqa: E402

VOCAB = 32768
SHAPE = ["train.global_batch=16", "train.micro_batch=4"]
WARMUP, STEPS = 3, 10
VARIANTS = {
    "eager (baseline)": [],
    "compiled": ["train.compile=true"],
    "eager, selective recomputation": ["train.activation_checkpointing=selective"],
    "compiled, selective recomputation": ["train.compile=true",
                                          "train.activation_checkpointing=selective"],
}


def measure(overrides: list[str]) -> dict:
    """Run one variant here; its tokens/s, MFU and peak memory."""
    loaded = load_config("llama-1b", SHAPE + overrides)
    config = dataclasses.replace(loaded, model=resolve_model(loaded.model, VOCAB))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    trainer = Trainer(config, Layout(), device, None)
    tokens = config.train.global_batch * config.data.seq_len
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(WARMUP + STEPS):
        batch = torch.randint(0, VOCAB, (config.train.global_batch, config.data.seq_len + 1),
                              generator=generator, dtype=torch.int32)
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        loss, _ = trainer.train_step(Sequences.of(Batch.of(list(batch.numpy())), device))
        loss.item()  # the step is done
        times.append(time.perf_counter() - started)
    step = statistics.median(times[WARMUP:])
    with torch.device("meta"):
        flops = GPT(gpt_shape(config.model)).flops_per_token(config.data.seq_len) * tokens
    return {"tokens_per_s": tokens / step, "mfu": flops / (step * peak_flops(device, None)),
            "peak_gb": memory_peaks(device)["peak"], "first_step_s": times[0]}


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU; this machine has none.")
    results = {}
    for name, overrides in VARIANTS.items():
        out = subprocess.run([sys.executable, __file__, "--variant", json.dumps(overrides)],
                             check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    base = results["eager (baseline)"]
    rows = [[name, f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}",
             f"{100 * r['mfu']:.1f}%", f"{r['peak_gb']:.1f}", f"{r['first_step_s']:.0f}"]
            for name, r in results.items()]
    gpu = torch.cuda.get_device_name(0)
    with torch.device("meta"):
        config = load_config("llama-1b", SHAPE)
        params = GPT(gpt_shape(resolve_model(config.model, VOCAB))).num_params()
    body = f"""## One GPU (`bench/gpu.py`)

`python bench/gpu.py` on {gpu}, {machine()}. The llama-1b preset ({params / 1e9:.2f}B
parameters, sequence 2048, vocabulary {VOCAB}), one GPU, bf16 autocast with fp32 master
weights and AdamW; micro-batches of 4 sequences, 16 per step; the median of {STEPS}
steps after {WARMUP} of warm-up (compilation). Target: MFU >= 45% with compile.

{markdown_table(["variant", "tokens/s", "÷ eager", "MFU", "peak GB", "first step s"], rows)}
"""
    print(body)
    write_section("gpu", body)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        main()
