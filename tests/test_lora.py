"""LoRA adapters (train.lora): the adapted model starts as its base, computes what a
hand-written LoRA computes, trains only the adapters (the base bit-identical after
training, a fraction of the optimizer state), and trains the same in every layout as
in one process."""

import copy

import pytest
import torch
from torch import nn

from raytron.model.gpt import GPT
from raytron.model.lora import TARGETS, LoraSpec, add_adapters, is_adapter
from raytron.platform.config.layout import Layout
from raytron.platform.config.resolve import gpt_shape
from raytron.platform.storage.checkpoint import CheckpointStore
from raytron.platform.worker.trainer import Sequences, Trainer

from parallel_harness import assert_same_run, batch, config, run_parallel, run_single

LORA = ["train.lora.rank=4", "train.lora.alpha=8"]
SPEC = LoraSpec(rank=4, alpha=8.0)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_shape(config([]).model), seed=3)


def test_an_adapted_model_starts_as_its_base_exactly():
    base = tiny_model()
    adapted = add_adapters(copy.deepcopy(base), SPEC)
    tokens = torch.randint(0, 128, (2, 16))
    assert torch.equal(adapted(tokens), base(tokens))
    trained = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trained and all(is_adapter(name) for name in trained)
    assert len(trained) == 2 * len(TARGETS) * len(base.layers)


def test_embeddings_train_whole_beside_the_adapters_when_asked():
    adapted = add_adapters(tiny_model(), LoraSpec(rank=4, alpha=8.0, train_embeddings=True))
    whole = {n for n, p in adapted.named_parameters() if p.requires_grad and not is_adapter(n)}
    assert whole == {"tok_embeddings.weight", "output.weight"}


def test_adapters_compute_a_hand_written_lora():
    """Logits and the adapters' gradients against the base model with the update added
    by forward hooks: y + (alpha / rank) * (x A^T) B^T."""
    base = tiny_model()
    adapted = add_adapters(copy.deepcopy(base), SPEC)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if name.endswith("lora_b"):
                param.normal_(0, 0.1)  # as after some training: the update is not zero
    tokens = torch.randint(0, 128, (2, 16))
    hand = {}
    for name, module in base.named_modules():
        if name.endswith(tuple(TARGETS.values())):
            a = adapted.get_submodule(name).lora_a.detach().clone().requires_grad_()
            b = adapted.get_submodule(name).lora_b.detach().clone().requires_grad_()
            hand[name] = (a, b)
            module.register_forward_hook(
                lambda _, args, out, a=a, b=b: out + SPEC.alpha / SPEC.rank * (args[0] @ a.T) @ b.T)
    want = base(tokens)
    got = adapted(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    want.square().mean().backward()
    got.square().mean().backward()
    for name, (a, b) in hand.items():
        module = adapted.get_submodule(name)
        torch.testing.assert_close(module.lora_a.grad, a.grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(module.lora_b.grad, b.grad, rtol=1e-5, atol=1e-8)
    assert all(p.grad is None for name, p in adapted.named_parameters() if not is_adapter(name))


def test_training_changes_only_the_adapters_with_a_fraction_of_the_optimizer_state():
    cfg = config(LORA)
    trainer = Trainer(cfg, Layout(), torch.device("cpu"), None)
    model = trainer.parts[0]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(3):
        trainer.train_step(Sequences.of(batch(step, cfg), torch.device("cpu")))
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != is_adapter(name), name
    full = Trainer(config([]), Layout(), torch.device("cpu"), None)
    full.train_step(Sequences.of(batch(0, cfg), torch.device("cpu")))
    adapter_state, full_state = (
        sum(t.numel() * t.element_size() for s in o.state.values() for t in s.values()
            if t.dim()) for o in (trainer.optimizers[0], full.optimizers[0]))
    adapters = sum(p.numel() for name, p in model.named_parameters() if is_adapter(name))
    assert adapter_state == 2 * 4 * adapters  # AdamW's two moments of the adapters alone
    assert adapter_state < 0.2 * full_state


LAYOUTS = {
    "dp2": ["parallel.dp=2"],
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "dp2-tp2": ["parallel.dp=2", "parallel.tp=2"],
}


@pytest.fixture(scope="module")
def one_process() -> dict:
    return run_single(LORA)


@pytest.mark.parametrize("name", LAYOUTS)
def test_lora_trains_as_in_one_process(one_process, name):
    assert_same_run(run_parallel(LORA + LAYOUTS[name]), one_process)


def test_lora_on_all_projections_under_tp_with_sequence_parallel_and_recompute():
    """Row-parallel adapters (o, down) take a sequence-sharded residual stream back."""
    overrides = LORA + ["train.lora.targets=[o,down,up]", "train.activation_checkpointing=full"]
    assert_same_run(run_parallel(overrides + ["parallel.tp=2"]), run_single(overrides))


def test_adapter_layers_are_plain_linear_layers_for_everything_else():
    adapted = add_adapters(tiny_model(), LoraSpec(rank=2, alpha=2.0, targets=("q",)))
    kinds = {type(m).__name__ for n, m in adapted.named_modules() if n.endswith("wq")}
    assert kinds == {"AdaptedLinear"} and isinstance(adapted.layers["0"].attention.wq, nn.Linear)
    assert type(adapted.layers["0"].attention.wk) is nn.Linear


def test_checkpoints_hold_the_adapters_and_resume_in_another_layout(one_process, tmp_path):
    """Written at tp2 with the adapters alone (and their optimizer state), resumed in one
    process: the uninterrupted run's losses."""
    run_parallel(LORA + ["parallel.tp=2"], stop=3, checkpoints=tmp_path)
    saved = CheckpointStore(tmp_path, keep_last=10).read_model(3)
    assert saved and all(is_adapter(name) for name in saved)
    resumed = run_single(LORA, start=3, stop=6, checkpoints=tmp_path, resume=True)
    assert resumed["losses"] == pytest.approx(one_process["losses"][3:], rel=1e-5)
