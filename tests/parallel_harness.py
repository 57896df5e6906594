"""Runs the Trainer in any (pp, dp, cp, tp) layout on spawned gloo processes, or in one plain
process, on the same tiny model and data, so that tests can compare the two."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem

from raytron.model.materialize import plain_name
from raytron.pipelines.packing import Batch, PairPacker, SamplePacker, TokenDoc
from raytron.platform.config.layout import Layout
from raytron.platform.config.load import load_config
from raytron.platform.config.resolve import resolve_model
from raytron.platform.models.initial import with_initial_model
from raytron.platform.storage.checkpoint import CheckpointStore
from raytron.platform.worker.layout import build_mesh
from raytron.platform.worker.references import (
    ReferenceTable,
    reference_rows,
    store_table,
    stored_table,
)
from raytron.platform.worker.task_scoring import score_in_layout
from raytron.platform.worker.trainer import Sequences, Trainer, whole_value

from gloo import run_on_gloo

BASE = ["model.n_layers=4", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_hidden=64", "model.vocab_size=128", "model.tie_embeddings=false",
        "data.seq_len=16", "train.global_batch=8", "train.micro_batch=2", "train.steps=6",
        "train.warmup_steps=1", "train.lr=1e-2", "train.min_lr=1e-3", "train.grad_clip=0.5",
        "data.val_sequences=8"]


def config(overrides: list[str]):
    loaded = with_initial_model(load_config("tiny", BASE + overrides))
    return dataclasses.replace(loaded, model=resolve_model(loaded.model, 128))


def batch(step: int, cfg, rows: int | None = None) -> Batch:
    """Random tokens; under data.packing=samples, random samples of 3 to 12 tokens packed
    whole, half of each learned, with per-sample positions when data.document_mask; under
    train.objective=dpo, random preference pairs (`pair`)."""
    generator = np.random.default_rng(1000 + step)
    rows = rows or cfg.train.global_batch
    length = cfg.data.seq_len + 1
    if cfg.train.objective == "dpo":
        packer = PairPacker(iter([pair(generator) for _ in range(rows)]), cfg.data.seq_len, pad=0)
        return Batch.of([packer.next_sequence() for _ in range(rows // 2)],
                        cfg.data.document_mask)
    if cfg.data.packing != "samples":
        return Batch.of(list(generator.integers(0, 128, (rows, length), dtype=np.int32)))
    samples = iter([TokenDoc(0, 0, 0, generator.integers(0, 128, size, dtype=np.int32),
                             targets=np.arange(size) >= size // 2)
                    for size in generator.integers(3, 13, rows * length)])
    packer = SamplePacker(samples, cfg.data.seq_len, pad=0)
    return Batch.of([packer.next_sequence() for _ in range(rows)], cfg.data.document_mask)


def pair(generator: np.random.Generator) -> TokenDoc:
    """A preference pair: a prompt of 2 to 6 random tokens, then a chosen and a rejected
    completion of 1 to 9 each (the prompt's tokens not learned)."""
    prompt = generator.integers(0, 128, generator.integers(2, 7), dtype=np.int32)
    sides = [np.concatenate([prompt, generator.integers(0, 128, generator.integers(1, 10),
                                                         dtype=np.int32)]) for _ in range(2)]
    return TokenDoc(0, 0, 0, np.concatenate(sides),
                    targets=np.concatenate([np.arange(len(side)) >= len(prompt) for side in sides]),
                    chosen_length=len(sides[0]))


def train(overrides: list[str], start: int, stop: int, checkpoints: Path | None,
          resume: bool, pairs: list | None = None, loss_chunk: int | None = None) -> dict:
    """Steps [start, stop) of the run; loads the checkpoint at `start` when `resume`,
    saves one at `stop` when `checkpoints` is given. Returns losses, norms, val loss, and
    the scores of `pairs` (context and continuation ids) after the last step. With
    `loss_chunk`, the loss computes the logits of that many tokens at a time."""
    cfg = config(overrides)
    layout = Layout.of(cfg)
    trainer = Trainer(cfg, layout, torch.device("cpu"), build_mesh(layout, "cpu"))
    if loss_chunk is not None:
        for part in trainer.parts:
            part.loss_chunk_tokens = loss_chunk
    rank = dist.get_rank() if dist.is_initialized() else 0
    dp_rank = layout.coordinates(rank)["dp"]
    share = cfg.train.global_batch // layout.dp
    store = CheckpointStore(checkpoints, keep_last=10) if checkpoints else None
    if resume:
        store.load(start, trainer.parts, trainer.optimizers)
        trainer.start_at(start)
    losses, norms = [], []
    cpu = torch.device("cpu")
    references = full_dpo_references(trainer, cfg, rank, checkpoints)
    for step in range(start, stop):
        mine = Sequences.of(batch(step, cfg).rows(dp_rank * share, (dp_rank + 1) * share), cpu)
        if references is not None:
            mine = references.attach(mine, step * cfg.train.global_batch + dp_rank * share)
        loss, norm = trainer.train_step(mine)
        losses.append(loss.item())
        norms.append(norm.item())
    idle = trainer.idle_shares()
    held_out = batch(-1, cfg, cfg.data.val_sequences)
    val_share = len(held_out) // layout.dp
    mine = Sequences.of(held_out.rows(dp_rank * val_share, (dp_rank + 1) * val_share), cpu)
    if references is not None:
        mine = references.attach(mine, dp_rank * val_share, held_out=True)
    val = trainer.evaluate(mine).item()
    scores = score_in_layout(trainer, pairs) if pairs else None
    if store:
        store.save(stop, trainer.parts, trainer.optimizers, {})
    return {"losses": losses, "norms": norms, "val_loss": val, "idle": idle,
            "task_scores": scores, "pair_statistics": trainer.pair_statistics(),
            "eval_statistics": trainer.eval_statistics}


def full_dpo_references(trainer: Trainer, cfg, rank: int, checkpoints: Path | None
                        ) -> ReferenceTable | None:
    """Under DPO without LoRA, the run's reference table as the worker loop makes it: the
    one stored with the checkpoints, or computed now (the weights are the starting ones)
    for all train.steps and the held-out set, and stored."""
    if cfg.train.objective != "dpo" or cfg.train.lora.rank:
        return None
    rows = cfg.train.steps * cfg.train.global_batch
    if checkpoints is not None:
        stored = stored_table(LocalFileSystem(), str(checkpoints),
                              rows + cfg.data.val_sequences)
        if stored is not None:
            return stored
    layout = Layout.of(cfg)
    at = layout.coordinates(rank)
    head = at["tp"] == 0 and at["cp"] == 0 and at["pp"] == layout.pp - 1
    share = cfg.train.global_batch // layout.dp
    cpu = torch.device("cpu")
    steps = [(step * cfg.train.global_batch + at["dp"] * share, Sequences.of(
        batch(step, cfg).rows(at["dp"] * share, (at["dp"] + 1) * share), cpu))
        for step in range(cfg.train.steps)]
    held_out = Sequences.of(batch(-1, cfg, cfg.data.val_sequences), cpu)
    table = ReferenceTable(reference_rows(trainer, steps, rows, head),
                           reference_rows(trainer, [(0, held_out)], len(held_out),
                                          head and at["dp"] == 0))
    if checkpoints is not None and rank == 0:
        store_table(LocalFileSystem(), str(checkpoints), table)
    return table


def run_parallel(overrides: list[str], start: int = 0, stop: int = 6,
                 checkpoints: Path | None = None, resume: bool = False,
                 pairs: list | None = None, loss_chunk: int | None = None) -> dict:
    """`train` on as many spawned gloo ranks as the layout in `overrides` needs."""
    cfg = config(overrides)
    return run_on_gloo(Layout.of(cfg).world, train, overrides, start, stop, checkpoints,
                       resume, pairs, loss_chunk)


def run_single(overrides: list[str] = (), start: int = 0, stop: int = 6,
               checkpoints: Path | None = None, resume: bool = False,
               pairs: list | None = None, loss_chunk: int | None = None) -> dict:
    """The reference: the same run in this process, no process group, no parallelism."""
    return train(list(overrides), start, stop, checkpoints, resume, pairs, loss_chunk)


def assert_same_run(got: dict, want: dict) -> None:
    """Losses and validation loss within 1e-5, gradient norms within 1e-4, relative."""
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
    assert got["norms"] == pytest.approx(want["norms"], rel=1e-4)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    for statistics in ("pair_statistics", "eval_statistics"):  # DPO's
        assert got[statistics] == pytest.approx(want[statistics], rel=1e-5, abs=5e-6)


def first_gradients(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The whole gradient of each parameter after the first step's backward pass, before
    any optimizer touches it (without a pipeline: rank 0 then holds every parameter)."""
    cfg = config(overrides)
    layout = Layout.of(cfg)
    trainer = Trainer(cfg, layout, torch.device("cpu"), build_mesh(layout, "cpu"))
    share = cfg.train.global_batch // layout.dp
    dp_rank = layout.coordinates(dist.get_rank() if dist.is_initialized() else 0)["dp"]
    mine = Sequences.of(batch(0, cfg).rows(dp_rank * share, (dp_rank + 1) * share),
                        torch.device("cpu"))
    trainer.loss_scale = layout.batch_ranks / mine.target_count
    trainer.accumulate(trainer.local(mine))
    return {plain_name(name): whole_value(param.grad).detach().clone()
            for name, param in trainer.parts[0].named_parameters() if param.requires_grad}


def parallel_gradients(overrides: list[str]) -> dict[str, torch.Tensor]:
    """`first_gradients` on as many spawned gloo ranks as the layout needs."""
    return run_on_gloo(Layout.of(config(overrides)).world, first_gradients, overrides)


def assert_same_parameters(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]
                           ) -> None:
    """The same parameters, within 1e-5 (and 1e-4 relative), but for a few elements in a
    thousand within 5e-5: AdamW's first update is lr * g / (|g| + eps), so a weight whose
    gradient is near eps moves by an amount that a sum taken in another order (a sharded
    matmul, ring attention, the CPU's vector width) changes by up to 2e-5, from
    gradients that agree to 4e-7 of their largest."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=5e-5, msg=key)
        loose = (got[key] - value).abs() > 1e-5 + 1e-4 * value.abs()
        assert loose.sum() <= max(1, value.numel() // 1000), key


def final_parameters(checkpoints: Path, step: int) -> dict[str, torch.Tensor]:
    """The model parameters of a checkpoint of any layout, loaded into one process."""
    cfg = config([])
    trainer = Trainer(cfg, Layout(), torch.device("cpu"), None)
    CheckpointStore(checkpoints, keep_last=10).load(step, trainer.parts, trainer.optimizers)
    return {k: v.detach().clone() for k, v in trainer.parts[0].state_dict().items()}
