"""Throughput of raytron's parallel layouts on this machine, one thread per rank.

    python bench/parallel.py            # ~15 minutes on 2 cores; writes docs/benchmarks.md
    python bench/parallel.py context    # part 5 alone, ~5 minutes

1. Platform overhead: tokens/s of `raytron train` (1x1x1, Ray, DataFeeder, MLflow) over
   tokens/s of a bare PyTorch loop over the same model and batch shapes in one process.
2. Pipeline efficiency: tokens/s of pp=2 with m micro-batches over 2x tokens/s of pp=1,
   beside the 1F1B bound m/(m+1).
3. tp=2 and dp=2 tokens/s over 1x1x1 tokens/s, with the same two cores.
4. Compiled blocks and full / selective recomputation over the eager run without
   recomputation: tokens/s and peak memory.
5. Context parallelism: tokens/s and the memory a step adds per rank at sequences of
   2k, 8k and 16k tokens, cp 1, 2 and 4, over cp=1 at the same length.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # gloo.py
from report import machine, markdown_table, write_section  # noqa: E402

from raytron.model.gpt import GPT, cross_entropy  # noqa: E402
from raytron.pipelines.packing import Batch  # noqa: E402
from raytron.platform.config.layout import Layout  # noqa: E402
from raytron.platform.config.load import load_config  # noqa: E402
from raytron.platform.config.resolve import gpt_shape, resolve_model  # noqa: E402
from raytron.platform.storage import metric_names as names  # noqa: E402
from raytron.platform.worker.layout import build_mesh  # noqa: E402
from raytron.platform.worker.optim import build_optimizer  # noqa: E402
from raytron.platform.worker.trainer import Sequences, Trainer  # noqa: E402

from gloo import run_on_gloo  # noqa: E402

MODEL = ["model.n_layers=8", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=8",
         "model.ffn_hidden=768", "model.vocab_size=2048", "model.tie_embeddings=false",
         "data.seq_len=128", "train.micro_batch=4"]
WARMUP, STEPS = 2, 6


def config(overrides: list[str]):
    loaded = load_config("tiny", MODEL + overrides)
    return dataclasses.replace(loaded, model=resolve_model(loaded.model, 2048))


def batches(cfg, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 2048, (cfg.train.global_batch, cfg.data.seq_len + 1),
                          generator=generator) for _ in range(count)]


def trainer_tokens_per_s(overrides: list[str]) -> float:
    """Steady tokens/s of the Trainer in the layout of `overrides` (run on every rank)."""
    cfg = config(overrides)
    layout = Layout.of(cfg)
    trainer = Trainer(cfg, layout, torch.device("cpu"), build_mesh(layout, "cpu"))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    dp_rank, share = layout.coordinates(rank)["dp"], cfg.train.global_batch // layout.dp
    times = []
    for tokens in batches(cfg, WARMUP + STEPS):
        started = time.perf_counter()
        trainer.train_step(Sequences.of(
            Batch.of(list(tokens.numpy())).rows(dp_rank * share, (dp_rank + 1) * share),
            torch.device("cpu")))
        times.append(time.perf_counter() - started)
    return cfg.train.global_batch * cfg.data.seq_len / statistics.median(times[WARMUP:])


def tokens_per_s_and_peak_gb(overrides: list[str]) -> tuple[float, float]:
    """Steady tokens/s and the process's peak resident memory (GB), in a fresh process
    of its own so that each variant's peak is its own."""
    from raytron.platform.worker.hardware import memory_peaks

    return trainer_tokens_per_s(overrides), memory_peaks(torch.device("cpu"))["peak"]


def layout_tokens_per_s(overrides: list[str]) -> float:
    cfg = config(overrides)
    world = Layout.of(cfg).world
    if world == 1:
        torch.set_num_threads(1)
        return trainer_tokens_per_s(overrides)
    return run_on_gloo(world, trainer_tokens_per_s, overrides)


def bare_loop_tokens_per_s(overrides: list[str]) -> float:
    """The same model and batch shapes in a plain PyTorch loop: no Ray, no raytron."""
    torch.set_num_threads(1)
    cfg = config(overrides)
    model = GPT(gpt_shape(cfg.model), seed=cfg.train.seed)
    optimizer = build_optimizer(model, cfg.train, fused=False)
    times = []
    for tokens in batches(cfg, WARMUP + STEPS):
        started = time.perf_counter()
        micro = tokens.split(cfg.train.micro_batch)
        for chunk in micro:
            (cross_entropy(model(chunk[:, :-1]), chunk[:, 1:]) / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return cfg.train.global_batch * cfg.data.seq_len / statistics.median(times[WARMUP:])


def raytron_train_tokens_per_s(overrides: list[str]) -> float:
    """`raytron train` on the embedded corpus; the median tokens/s it logged after warm-up."""
    from mlflow import MlflowClient

    steps = 3 * (WARMUP + STEPS)
    with tempfile.TemporaryDirectory() as root:
        command = [sys.executable, "-m", "raytron.platform.cli", "train", "tiny", *MODEL,
                   *overrides, f"run.root={root}", "run.name=bench", f"train.steps={steps}",
                   "train.log_interval=1", "train.eval_interval=0",
                   f"checkpoint.interval={steps}", "cluster.cpus_per_worker=1"]
        subprocess.run(command, check=True, capture_output=True, cwd=root)
        client = MlflowClient(f"sqlite:///{root}/mlflow.db")
        run_id = Path(root, "bench", "mlflow_run_id").read_text().strip()
        history = client.get_metric_history(run_id, names.TOKENS_PER_S)
        return statistics.median(m.value for m in history if m.step > WARMUP)


CONTEXT_MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4",
                 "model.n_kv_heads=4", "model.ffn_hidden=192", "model.vocab_size=256",
                 "train.global_batch=1", "train.micro_batch=1"]


def context_rank(overrides: list[str]) -> tuple[float, float, float]:
    """(tokens/s, peak resident GB, GB the steps add to what the rank held before them)
    of one context-parallel rank, the busiest of its group."""
    from raytron.platform.worker.hardware import memory_peaks

    torch.set_num_threads(1)
    cfg = config(CONTEXT_MODEL + overrides)
    layout = Layout.of(cfg)
    trainer = Trainer(cfg, layout, torch.device("cpu"), build_mesh(layout, "cpu"))
    tokens = torch.randint(0, 256, (1, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    before = memory_peaks(torch.device("cpu"))["peak"]  # starts the peak's count again
    times = []
    for _ in range(3):
        started = time.perf_counter()
        trainer.train_step(Sequences.of(Batch.of(list(tokens.numpy())), torch.device("cpu")))
        times.append(time.perf_counter() - started)
    peak = memory_peaks(torch.device("cpu"))["peak"]
    mine = (cfg.data.seq_len / statistics.median(times[1:]), peak, peak - before)
    if not torch.distributed.is_initialized():
        return mine
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return max(every, key=lambda row: row[2])


def context_rows() -> list[list[str]]:
    rows = []
    for seq_len in (2048, 8192, 16384):
        base = None
        for cp in (1, 2, 4):
            speed, peak, added = run_on_gloo(cp, context_rank, [f"data.seq_len={seq_len}",
                                                                f"parallel.cp={cp}"])
            base = base or (speed, added)
            rows.append([f"{seq_len:,}", str(cp), f"{speed:,.0f}", f"{speed / base[0]:.2f}",
                         f"{peak:.2f}", f"{added:.3f}", f"{added / base[1]:.2f}",
                         f"{1 / cp:.2f}"])
    return rows


def context_section(rows: list[list[str]]) -> str:
    with torch.device("meta"):
        params = GPT(gpt_shape(config(CONTEXT_MODEL).model)).num_params()
    table = markdown_table(["tokens", "cp", "tokens/s", "÷ cp=1", "peak RSS GB per rank",
                            "GB a step adds per rank", "÷ cp=1", "1/cp"], rows)
    return f"""### Context parallelism (`python bench/parallel.py context`)

On {machine()}; one thread per rank, gloo between ranks (cp=4 puts 4 ranks on the 2
cores). Model: {params / 1e3:.0f}k parameters (`{' '.join(CONTEXT_MODEL)}`), one
sequence per step split over the cp ranks, fp32, AdamW; the median of 2 steps after 1
of warm-up. Memory is the busiest rank's: its peak resident set during the steps, and
what the steps added to what it held before them (activations, the ring's blocks,
gradients and AdamW state, a share of which FSDP puts on each cp rank).

{table}
"""


def ratio_row(name: str, value: float, base: float, bound: str = "") -> list[str]:
    return [name, f"{value:,.0f}", f"{value / base:.2f}", bound]


def main() -> None:
    if sys.argv[1:] == ["context"]:
        body = context_section(context_rows())
        print(body)
        write_section("parallel-context", body)
        return
    batch = ["train.global_batch=16"]
    bare = bare_loop_tokens_per_s(batch)
    platform = raytron_train_tokens_per_s(batch)
    overhead = [ratio_row("bare PyTorch loop, 1 process (baseline)", bare, bare),
                ratio_row("`raytron train`, 1x1x1 on Ray", platform, bare, ">= 0.95")]

    single = {}
    pipeline = []
    for m in (2, 4, 8):
        batch_m = [f"train.global_batch={4 * m}"]
        single[m] = layout_tokens_per_s(batch_m)
        pp2 = layout_tokens_per_s(batch_m + ["parallel.pp=2"])
        pipeline.append([f"pp=2, m={m}", f"{single[m]:,.0f}", f"{pp2:,.0f}",
                         f"{pp2 / (2 * single[m]):.2f}", f"{m / (m + 1):.2f}"])

    one = single[4]
    layouts = [ratio_row("1x1x1 (baseline)", one, one)]
    for name, overrides in (("tp=2", ["parallel.tp=2"]), ("dp=2 (FSDP)", ["parallel.dp=2"]),
                            ("dp=2 (DDP)", ["parallel.dp=2", "parallel.dp_shard=none"])):
        layouts.append(ratio_row(name, layout_tokens_per_s(["train.global_batch=16"]
                                                           + overrides), one, "2.00"))

    variants = []
    compute = ["train.global_batch=16", "train.micro_batch=16", "data.seq_len=256"]
    eager = None
    for name, overrides in (
        ("eager, no recomputation (baseline)", []),
        ("compiled", ["train.compile=true"]),
        ("recompute full", ["train.activation_checkpointing=full"]),
        ("recompute selective", ["train.activation_checkpointing=selective"]),
        ("compiled + recompute selective", ["train.compile=true",
                                            "train.activation_checkpointing=selective"]),
    ):
        speed, peak = run_on_gloo(1, tokens_per_s_and_peak_gb, compute + overrides)
        eager = eager or (speed, peak)
        variants.append([name, f"{speed:,.0f}", f"{speed / eager[0]:.2f}", f"{peak:.2f}",
                         f"{peak - eager[1]:+.2f}"])

    tables = {
        "overhead": markdown_table(["run", "tokens/s", "ratio", "target"], overhead),
        "pipeline": markdown_table(["layout", "pp=1 tokens/s", "pp=2 tokens/s",
                                    "efficiency", "1F1B bound m/(m+1)"], pipeline),
        "layouts": markdown_table(["layout (global batch 16)", "tokens/s", "÷ 1x1x1",
                                   "ideal"], layouts),
        "variants": markdown_table(["1x1x1, micro-batch 16 x 256 tokens", "tokens/s",
                                    "÷ eager", "peak RSS GB", "Δ GB"], variants),
    }
    with torch.device("meta"):
        params = GPT(gpt_shape(config([]).model)).num_params()
    body = f"""## Parallel layouts (`bench/parallel.py`)

`python bench/parallel.py` on {machine()}; one thread per rank, gloo between ranks.
Model: {params / 1e6:.1f}M parameters (`{' '.join(MODEL)}`), AdamW, fp32; each figure is
the median of {STEPS} steps after {WARMUP} of warm-up.

Platform overhead (global batch 16):

{tables['overhead']}

Pipeline efficiency (1F1B, micro-batch 4, global batch 4m):

{tables['pipeline']}

Tensor and data parallelism against one rank:

{tables['layouts']}

Compilation (`train.compile`) and recomputation (`train.activation_checkpointing`), one
process each (its peak resident memory: weights, AdamW state and the Python runtime are
the same in every row, so the differences are activations and compiled code):

{tables['variants']}
"""
    print(body)
    write_section("parallel", body)
    context = context_section(context_rows())
    print(context)
    write_section("parallel-context", context)


if __name__ == "__main__":
    main()
