"""Many LoRA adapters on one served base model, each row of a batch with its own (as
S-LoRA and Punica serve them): a replica serves many adapters without a copy of the base
per adapter, and requests for different adapters and for the base decode together.

`AdapterBank` swaps each target projection of a loaded model for a `BankedLinear`, which
keeps the base's weight and holds the bank's adapters stacked: A (slots, R, in) and
B (slots, out, R) with a scale each, R the largest rank the bank takes (a smaller rank
is padded with zeros, which add exact zeros). Slot 0 is the base: all zeros. Before a
forward the engine says which slot each row uses (`rows`); each row gathers its own A
and B, and its update is two batched matmuls over the batch. A batch of base rows only
skips the update, and computes exactly what the base alone computes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raytron.model.lora import TARGETS

BASE = 0  # the bank slot of the base model: no update


@dataclass(frozen=True)
class Adapter:
    """One adapter's weights under raytron's module names (`layers.0.attention.wq` ->
    (A, B)); `version` changes when its files do, so that a changed adapter loads again."""

    name: str
    version: str
    rank: int
    scale: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def projections(model: nn.Module) -> dict[str, nn.Linear]:
    """The projections an adapter may adapt, by name (`layers.0.attention.wq`)."""
    paths = tuple(TARGETS.values())
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.endswith(paths)}


def fit_problem(adapter: Adapter, shapes: dict[str, tuple[int, int]], max_rank: int
                ) -> str | None:
    """Why `adapter` does not fit a model whose projections have `shapes` (in, out), or
    a bank of `max_rank`; None when it fits."""
    if adapter.rank > max_rank:
        return f"its rank {adapter.rank} is above the largest this server takes ({max_rank})"
    for name, (a, b) in adapter.weights.items():
        if name not in shapes:
            return f"it adapts {name}, which the model does not have"
        fan_in, fan_out = shapes[name]
        if a.shape != (adapter.rank, fan_in) or b.shape != (fan_out, adapter.rank):
            return f"its {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, and the " \
                   f"model's projection takes ({adapter.rank}, {fan_in}) and " \
                   f"({fan_out}, {adapter.rank})"
    return None


class RowSlots:
    """The bank slot of each row of the forward under way (None: the base for all), shared
    by every `BankedLinear` of a bank."""

    rows: torch.Tensor | None = None


class BankedLinear(nn.Linear):
    def __init__(self, base: nn.Linear, slots: int, rank: int, selection: RowSlots):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device="meta")
        self.weight, self.bias = base.weight, base.bias
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("lora_a", torch.zeros(slots, rank, base.in_features, **like))
        self.register_buffer("lora_b", torch.zeros(slots, base.out_features, rank, **like))
        self.register_buffer("scales", torch.zeros(slots, **like))
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        rows = self.selection.rows
        if rows is None:
            return out
        down = torch.bmm(x, self.lora_a[rows].transpose(1, 2))
        return out + torch.bmm(down, self.lora_b[rows].transpose(1, 2)) * \
            self.scales[rows].view(-1, 1, 1)


class AdapterBank:
    """`slots` adapters of rank up to `max_rank` on `model`'s projections, loaded as
    requests need them: into a free slot, else into the least recently used one that no
    running row uses."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int):
        self.slots, self.max_rank = slots, max_rank
        self.selection = RowSlots()
        self.modules: dict[str, BankedLinear] = {}
        for name, module in projections(model).items():
            banked = BankedLinear(module, slots + 1, max_rank, self.selection)
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, banked)
            self.modules[name] = banked
        self.shapes = {name: (m.in_features, m.out_features) for name, m in self.modules.items()}
        self.device = next(iter(self.modules.values())).weight.device
        self.held: dict[int, tuple[str, str]] = {}  # slot -> (name, version)
        self.last_used: dict[int, int] = {}
        self.uses = 0

    def problem(self, adapter: Adapter) -> str | None:
        """Why `adapter` does not fit this bank's model, or None."""
        return fit_problem(adapter, self.shapes, self.max_rank)

    def place(self, adapter: Adapter, busy: set[int]) -> int | None:
        """The slot holding `adapter`, loaded into one first if needed; None while every
        slot holds an adapter that a row in `busy` uses."""
        self.uses += 1
        key = (adapter.name, adapter.version)
        slot = next((s for s, held in self.held.items() if held == key), None)
        if slot is None:
            free = [s for s in range(1, self.slots + 1) if s not in self.held]
            idle = sorted((s for s in self.held if s not in busy), key=self.last_used.get)
            if not free and not idle:
                return None
            slot = (free or idle)[0]
            self.write(slot, adapter)
            self.held[slot] = key
        self.last_used[slot] = self.uses
        return slot

    @torch.inference_mode()
    def write(self, slot: int, adapter: Adapter) -> None:
        for name, module in self.modules.items():
            module.lora_a[slot].zero_()
            module.lora_b[slot].zero_()
            module.scales[slot] = adapter.scale
            if name in adapter.weights:
                a, b = adapter.weights[name]
                module.lora_a[slot, : adapter.rank].copy_(a)
                module.lora_b[slot, :, : adapter.rank].copy_(b)

    def loaded(self) -> int:
        return len(self.held)

    @contextlib.contextmanager
    def rows(self, slots: Sequence[int]) -> Iterator[None]:
        """Within the block, row i of a forward uses the adapter in `slots[i]`."""
        self.selection.rows = torch.tensor(slots, device=self.device) \
            if any(slot != BASE for slot in slots) else None
        try:
            yield
        finally:
            self.selection.rows = None
