"""How a batch reaches the device: int32 host tensors copied without blocking the host
(from pinned memory on a GPU), cast to int64 there; micro-batches of one shape."""

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raytron.model.gpt import IGNORE
from raytron.pipelines.packing import Batch
from raytron.platform.worker.trainer import Sequences, to_device


class Copies(TorchDispatchMode):
    """The host-to-device copies made under it: (source dtype, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[torch.dtype, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None \
                and args[0].device.type == "cpu":
            self.seen.append((args[0].dtype, kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_a_batch_crosses_to_the_device_as_int32_without_blocking():
    """The meta device stands in for a GPU: the copy to it is what a GPU's would be."""
    rows = np.arange(2 * 9, dtype=np.int32).reshape(2, 9)
    rows.flags.writeable = False  # as Ray's object store hands it out
    batch = Batch.of(list(rows))
    with Copies() as copies:
        sequences = Sequences.of(batch, torch.device("meta"))
    assert copies.seen == [(torch.int32, True)]
    assert sequences.inputs.dtype == torch.int64 and sequences.inputs.shape == (2, 8)
    assert torch.equal(to_device(rows, torch.device("cpu")), torch.tensor(rows, dtype=torch.int64))


def test_the_last_micro_batch_is_padded_with_rows_that_learn_nothing():
    rows = np.arange(5 * 9, dtype=np.int32).reshape(5, 9)
    sequences = Sequences.of(Batch.of(list(rows)), torch.device("cpu"))
    micro = sequences.split(2)
    assert [len(m) for m in micro] == [2, 2, 2]
    assert (micro[-1].labels[1] == IGNORE).all()
    assert torch.equal(micro[-1].labels[0], sequences.labels[4])
