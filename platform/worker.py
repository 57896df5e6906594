"""The training loop every worker of the group runs (one Ray actor per device).

A worker builds the model from the seed, resumes from the last committed checkpoint
if there is one, and then trains: each step pulls its replica's slice of the global
batch from the DataFeeder, accumulates gradients over micro-batches, clips, steps
AdamW and the schedule. Rank 0 reports metrics; every rank writes its checkpoint
shards. Nothing here depends on the process being the first of its run: a restarted
worker group picks up from the checkpoint exactly where the last one committed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from raytron.model.gpt import GPT, cross_entropy
from raytron.model.parallelize import parallelize
from raytron.platform.checkpoint import CheckpointStore
from raytron.platform.config import RaytronConfig
from raytron.platform.hardware import autocast_dtype, peak_flops, training_device
from raytron.platform.optim import build_optimizer, build_scheduler
from raytron.platform.shapes import gpt_shape
from raytron.platform.step import StepParts, train_step


@dataclass
class WorkerArgs:
    config: RaytronConfig
    checkpoint_dir: str  # absolute: workers run in a directory of Ray's choosing
    feeder: Any  # DataFeeder actor handle
    tracker: Any  # Tracker actor handle


def train_loop(args: dict) -> None:
    """Ray Train's `train_loop_per_worker`."""
    context = ray.train.get_context()
    WorkerLoop(WorkerArgs(**args), context.get_world_rank(), context.get_world_size(),
               context.get_local_rank()).run()


class WorkerLoop:
    def __init__(self, args: WorkerArgs, rank: int, world: int, local_rank: int):
        self.args, self.config = args, args.config
        self.rank, self.dp_rank, self.dp_size = rank, rank, world
        torch.set_num_threads(self.config.cluster.cpus_per_worker)
        self.device = training_device(local_rank)
        self.peak_flops = peak_flops(self.device, self.config.train.peak_flops)
        torch.manual_seed(self.config.train.seed)
        self.model = GPT(gpt_shape(self.config.model)).to(self.device)
        self.flops_per_token = self.model.flops_per_token(self.config.data.seq_len)
        self.wrapped = parallelize(self.model, self.device)
        self.optimizer = build_optimizer(self.model, self.config.train,
                                         fused=self.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, self.config.train)
        self.parts = StepParts(self.model, self.wrapped, self.optimizer, self.scheduler,
                               autocast_dtype(self.config.train.precision, self.device),
                               self.dp_size)
        self.store = CheckpointStore(args.checkpoint_dir, self.config.checkpoint.keep_last)
        self.validation: torch.Tensor | None = None

    def run(self) -> None:
        train = self.config.train
        step, meta = self.resume()
        first_step = step + 1  # logged too, so every (re)start shows where it begins
        tokens_seen = meta.get("tokens_seen", 0)
        tokens_per_step = train.global_batch * self.config.data.seq_len
        window_started, window_wait, window_steps = time.perf_counter(), 0.0, 0
        while step < train.steps:
            loss, grad_norm, wait = self.train_step(step)
            step += 1
            tokens_seen += tokens_per_step
            window_wait += wait
            window_steps += 1
            if step % train.log_interval == 0 or step == train.steps or step == first_step:
                elapsed = time.perf_counter() - window_started
                step_time = elapsed / window_steps
                self.report(step, {
                    "loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm.item(), "step_time_s": step_time,
                    "input_wait_s": window_wait / window_steps,
                    "tokens_per_s": tokens_per_step / step_time,
                    "mfu": self.flops_per_token * tokens_per_step
                    / (step_time * self.dp_size * self.peak_flops),
                    "tokens_seen": tokens_seen,
                }, with_data_stats=True)
                window_started, window_wait, window_steps = time.perf_counter(), 0.0, 0
            if train.eval_interval and (step % train.eval_interval == 0 or step == train.steps):
                self.evaluate(step)
            if step % self.config.checkpoint.interval == 0 or step == train.steps:
                self.save(step, tokens_seen)

    def resume(self) -> tuple[int, dict]:
        """Load the latest committed checkpoint, if any, and point the feeder at its cursor."""
        latest = self.store.latest()
        meta = (self.store.load(latest, self.wrapped, self.optimizer, self.scheduler)
                if latest is not None else {})
        step = meta.get("step", 0)
        if self.rank == 0:
            ray.get(self.args.feeder.seek.remote(step, meta.get("cursor", {})))
        if dist.is_initialized():
            dist.barrier()
        return step, meta

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over this replica's slice; returns mean loss, grad norm, wait."""
        started = time.perf_counter()
        batch = ray.get(self.args.feeder.batch.remote(step, self.dp_rank, self.dp_size))
        wait = time.perf_counter() - started
        tokens = torch.from_numpy(batch.astype(np.int64)).to(self.device, non_blocking=True)
        loss, grad_norm = train_step(self.parts, tokens, self.config.train.micro_batch,
                                     self.config.train.grad_clip)
        return loss, grad_norm, wait

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """Loss and perplexity on the held-out sequences (the same ones every time)."""
        if self.validation is None:
            held_out = ray.get(self.args.feeder.validation.remote(self.dp_rank, self.dp_size))
            self.validation = torch.from_numpy(held_out.astype(np.int64)).to(self.device)
        if len(self.validation) == 0:
            return
        self.model.eval()
        total = torch.zeros((), device=self.device)
        micro_batches = self.validation.split(self.config.train.micro_batch)
        for micro in micro_batches:
            with self.parts.autocast_context(self.device):
                total += cross_entropy(self.model(micro[:, :-1]), micro[:, 1:]) * len(micro)
        self.model.train()
        loss = self.parts.mean_over_replicas(total / len(self.validation)).item()
        self.report(step, {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))})

    def save(self, step: int, tokens_seen: int) -> None:
        cursor = ray.get(self.args.feeder.cursor.remote(step))
        meta = {"cursor": cursor, "tokens_seen": tokens_seen,
                "layout": {"pp": 1, "dp": self.dp_size, "tp": 1}, "time": time.time()}
        self.store.save(step, self.wrapped, self.optimizer, self.scheduler, meta)
        self.report(step, {"checkpoint_step": step})

    def report(self, step: int, metrics: dict[str, float], with_data_stats: bool = False) -> None:
        if self.rank != 0:
            return
        if with_data_stats:
            metrics = {**metrics, **ray.get(self.args.feeder.stats.remote())}
        self.args.tracker.log.remote(step, metrics)
