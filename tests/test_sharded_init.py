"""Each rank builds its stages on the meta device and materializes only its shards: the
values equal the eager single-process init, and what every rank holds (parameters,
gradients, AdamW moments) is exactly what `raytron plan` says it holds."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from raytron.model.gpt import GPT
from raytron.model.materialize import plain_name
from raytron.platform.config.layout import Layout
from raytron.platform.config.plan import make_plan
from raytron.platform.config.resolve import gpt_shape
from raytron.platform.worker.layout import build_mesh
from raytron.platform.worker.trainer import Sequences, Trainer

from gloo import run_on_gloo
from parallel_harness import batch, config

LAYOUTS = {
    "dp2-tp2-tied-recompute": ["parallel.dp=2", "parallel.tp=2", "model.tie_embeddings=true",
                               "train.activation_checkpointing=full"],
    "dp3-uneven-shards": ["parallel.dp=3", "model.d_model=40", "model.n_heads=5",
                          "model.n_kv_heads=5", "model.ffn_hidden=70", "train.global_batch=6"],
    "pp2-dp2-zero2": ["parallel.pp=2", "parallel.dp=2", "parallel.dp_shard=grad-op"],
    "dp2-ddp-tp2-no-sp": ["parallel.dp=2", "parallel.dp_shard=none", "parallel.tp=2",
                          "parallel.sequence_parallel=false"],
}


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def build_and_count(overrides: list[str]) -> dict:
    """On every rank: whether its initial parameters equal the eager init, and the
    elements it holds after one step; rank 0 returns them for all ranks."""
    cfg = config(overrides)
    layout = Layout.of(cfg)
    trainer = Trainer(cfg, layout, torch.device("cpu"), build_mesh(layout, "cpu"))
    eager = dict(GPT(gpt_shape(cfg.model), seed=cfg.train.seed).named_parameters())
    mismatched = [name for part in trainer.parts for name, param in part.named_parameters()
                  if not torch.equal(param.full_tensor() if isinstance(param, DTensor)
                                     else param, eager[plain_name(name)])]
    dp_rank = layout.coordinates(dist.get_rank())["dp"]
    share = cfg.train.global_batch // layout.dp
    mine = batch(0, cfg).rows(dp_rank * share, (dp_rank + 1) * share)
    grads = []  # counted as the optimizer steps: it drops them after
    for optimizer in trainer.optimizers:
        optimizer.register_step_pre_hook(lambda opt, *_: grads.extend(
            local(x.grad).numel() for group in opt.param_groups for x in group["params"]
            if x.grad is not None))
    trainer.train_step(Sequences.of(mine, torch.device("cpu")))
    params = trainer.parameters()
    moments = [local(state[key]).numel() for optimizer in trainer.optimizers
               for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    held = {"mismatched": mismatched,
            "params": sum(local(x).numel() for x in params),
            "grads": sum(grads),
            "moments": sum(moments)}
    everyone: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, held)
    return everyone


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_rank_holds_its_planned_share_of_the_eager_init(name):
    overrides = LAYOUTS[name]
    cfg = config(overrides)
    plan = make_plan(cfg)
    ranks = run_on_gloo(cfg.parallel.pp * int(cfg.parallel.dp) * cfg.parallel.tp,
                        build_and_count, overrides)
    whole = GPT(gpt_shape(cfg.model)).num_params()
    for rank, held in enumerate(ranks):
        assert held["mismatched"] == [], f"rank {rank}"
        want = plan.held(rank)
        assert (held["params"], held["grads"], held["moments"]) == (want, want, 2 * want), \
            f"rank {rank}"
        assert want < whole  # a share, not the whole model
