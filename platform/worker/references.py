"""DPO's reference for a full fine-tune (train.objective=dpo without train.lora).

DPO's reference model is the starting point. With LoRA it is the base with the adapters
off, computed at each step; without, the weights that train are the only copy of the
model, so before the first step one pass over every batch the run will train on (and
over the held-out pairs) computes each row's reference log-probability with the
starting weights, as TRL's `precompute_ref_log_probs` does. The table is indexed by the
row's place in the data stream (step x train.global_batch + its row), which no layout
changes, and is written beside the checkpoints once: a restart, a resume and another
layout read it and never recompute it (a resume refuses new train.steps,
train.global_batch and data.val_sequences, which decide its rows). It is data: a
safetensors file of two float tensors, read no further than its expected size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.distributed as dist

REFERENCE_FILE = "dpo_reference.safetensors"
HEADER_BYTES = 1 << 16


class ReferencesUnusable(RuntimeError):
    """The stored reference table does not hold the rows the run trains on."""


@dataclasses.dataclass
class ReferenceTable:
    train: torch.Tensor  # (rows, 2): each row's reference log-probability, learned tokens
    validation: torch.Tensor  # (rows, 2): the held-out set's

    def attach(self, batch, first_row: int, held_out: bool = False):
        """`batch` (Sequences) with the reference of its rows, the first `first_row`."""
        table = self.validation if held_out else self.train
        rows = table[first_row : first_row + len(batch)]
        if len(rows) != len(batch):
            raise ReferencesUnusable(
                f"the DPO reference table holds {len(table)} {'held-out ' if held_out else ''}"
                f"rows, and rows {first_row} to {first_row + len(batch) - 1} are needed")
        return dataclasses.replace(batch, reference=rows.to(batch.inputs.device))

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({"train": self.train.contiguous(),
                     "validation": self.validation.contiguous()})

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceTable:
        from safetensors.torch import load

        tensors = load(data)
        if set(tensors) != {"train", "validation"} or any(
                t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != 2
                for t in tensors.values()):
            raise ReferencesUnusable("the DPO reference table is not the one raytron writes")
        return cls(tensors["train"], tensors["validation"])


def reference_rows(trainer, batches: Iterable[tuple[int, object]], rows: int,
                   contributes: bool) -> torch.Tensor:
    """The reference of `rows` rows: `batches` are (first row, Sequences) of this replica
    in data order. Collective: every rank passes its replica's batches; the ranks that
    `contribute` (one per replica, holding the head) give their rows, summed over all."""
    from raytron.platform.storage.checkpoint import end_group, passing_group

    table = torch.zeros(rows, 2)
    for first, batch in batches:
        values = trainer.with_reference(batch).reference
        if contributes:
            table[first : first + len(values)] = values.cpu()
    group = passing_group()  # gloo's threads gone after (see `passing_group`)
    if group is not None:
        dist.all_reduce(table, group=group)
    end_group(group)
    return table


def stored_table(fs, root: str, rows: int) -> ReferenceTable | None:
    """The table beside the checkpoints, if written (ReferencesUnusable when it is not
    a table of about `rows` rows)."""
    path = f"{root}/{REFERENCE_FILE}"
    if not fs.exists(path):
        return None
    limit = rows * 2 * 4 + HEADER_BYTES
    with fs.open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ReferencesUnusable(f"{path} holds more than the {rows} rows it should")
    return ReferenceTable.from_bytes(data)


def store_table(fs, root: str, table: ReferenceTable) -> None:
    from raytron.platform.storage.checkpoint import write_atomically

    fs.makedirs(root, exist_ok=True)
    write_atomically(fs, f"{root}/{REFERENCE_FILE}", table.to_bytes())
