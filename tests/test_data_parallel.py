"""Data parallelism (DDP over gloo) against the single-process run of the same steps."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raytron.model.gpt import GPT, GPTShape
from raytron.model.parallelize import parallelize
from raytron.platform.config import TrainConfig
from raytron.platform.optim import build_optimizer, build_scheduler
from raytron.platform.step import StepParts, train_step

TRAIN = TrainConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, steps=3, grad_clip=1.0)
SHAPE = GPTShape(2, 32, 4, 2, 64, 61, 16)
GLOBAL_BATCH, MICRO_BATCH, STEPS = 8, 2, 3


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 61, (GLOBAL_BATCH, 17), generator=generator) for _ in range(STEPS)]


def train(rank: int, world: int) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = GPT(SHAPE)
    optimizer = build_optimizer(model, TRAIN, fused=False)
    parts = StepParts(model, parallelize(model, torch.device("cpu")), optimizer,
                      build_scheduler(optimizer, TRAIN), None, world)
    share = GLOBAL_BATCH // world
    losses = []
    for batch in batches():
        loss, _ = train_step(parts, batch[rank * share : (rank + 1) * share], MICRO_BATCH,
                             TRAIN.grad_clip)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def rank_main(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = train(rank, world)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_matches_one_process(tmp_path, world):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "rank0.pt"
    mp.spawn(rank_main, args=(world, str(tmp_path / "store"), str(out)), nprocs=world)
    parallel_losses, parallel_state = torch.load(out)
    losses, state = train(0, 1)
    assert parallel_losses == pytest.approx(losses, rel=1e-5)
    for name, value in state.items():
        torch.testing.assert_close(parallel_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
