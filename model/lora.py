"""LoRA (Hu et al. 2021): a frozen base model and, on chosen projections, a trained
low-rank update, y = x Wᵀ + (alpha / rank) · B A x, with A (rank × in) and B (out × rank).

Added from outside the model, as the parallelisms are: `add_adapters` swaps the chosen
`nn.Linear`s for `AdaptedLinear`s, which keep the base's parameter names (checkpoints,
initial values and exports of the base are untouched) and gain `lora_a` and `lora_b`.
B starts at zero, so the adapted model starts as the base exactly; A as PEFT's default
(Kaiming-uniform). Tensor parallelism splits the adapters to match their base
(model/parallelize.py): a column-parallel base's B by its output rows, a row-parallel
base's A by its input columns.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from raytron.model.gpt import name_seed
from raytron.model.materialize import InitialValue
from raytron.model.spec import TARGETS, LoraSpec

ADAPTER_PARAMS = ("lora_a", "lora_b")
EMBEDDINGS = ("tok_embeddings.", "output.")  # LoraSpec.train_embeddings


class AdaptedLinear(nn.Linear):
    """A linear layer whose weight (and bias) stay frozen, plus a low-rank update."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LoraSpec,
                 device: torch.device | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.lora_a = nn.Parameter(torch.empty(spec.rank, in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, spec.rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # training draws its own
        self.scale = spec.scale
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.enabled = True  # False: the base alone (`adapters_off`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return base
        return base + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale


@contextlib.contextmanager
def adapters_off(models: Iterable[nn.Module]) -> Iterator[None]:
    """The base model within the block: DPO's reference, without a copy of the model."""
    adapted = [module for model in models for module in model.modules()
               if isinstance(module, AdaptedLinear)]
    for module in adapted:
        module.enabled = False
    try:
        yield
    finally:
        for module in adapted:
            module.enabled = True


def add_adapters(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """`model` with each target projection of every block adapted (its weights kept)
    and every other parameter frozen (but the embeddings with `train_embeddings`); on
    the meta device before parallelization."""
    paths = tuple(TARGETS[target] for target in spec.targets)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.endswith(paths):
            parent_name, _, child = name.rpartition(".")
            adapted = AdaptedLinear(module.in_features, module.out_features,
                                    module.bias is not None, spec, module.weight.device)
            adapted.weight, adapted.bias = module.weight, module.bias
            model.get_submodule(parent_name).register_module(child, adapted)
    for name, param in model.named_parameters():  # tensor parallelism and FSDP keep it
        param.requires_grad_(is_adapter(name) or spec.train_embeddings
                             and name.startswith(EMBEDDINGS))
    return model


def is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def with_adapter_values(initial: InitialValue, seed: int) -> InitialValue:
    """`initial` for the base's parameters, and the adapters' own start, drawn from `seed`
    and the name alone as the base's are (the same values in every layout). B: zeros,
    so the adapted model starts as the base. A: Kaiming-uniform with a = √5 (PEFT's and
    nn.Linear's default), uniform in ±1/√in."""
    def value(name: str, shape: torch.Size) -> torch.Tensor:
        if not is_adapter(name):
            return initial(name, shape)
        if name.endswith("lora_b"):
            return torch.zeros(shape)
        bound = 1 / math.sqrt(shape[1])
        generator = torch.Generator().manual_seed(name_seed(seed, name))
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return value
