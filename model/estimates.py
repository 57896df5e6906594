"""Memory of a GPT stage under a (pp, dp, cp, tp) layout, estimated from its shape.

What `raytron plan` prints, and what refuses a layout that cannot fit. Memory is an
estimate (a lower bound: allocator slack, communication buffers and temporaries are
not counted) per device; parameter counts come from the model itself (on the meta
device), FLOPs from `GPT.flops_per_token`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raytron.model.gpt import LOSS_CHUNK_ELEMENTS, GPTShape
from raytron.model.parallelize import tensor_parallel_dim

GB = 1e9
OPTIMIZER_BYTES = 8  # AdamW: two fp32 moments per parameter
MASTER_BYTES = 4  # fp32 parameters
GRADIENT_BYTES = 4  # fp32 gradients (FSDP reduces in fp32)


def activation_bytes_per_layer(shape: GPTShape, micro_batch: int, seq_len: int, tp: int,
                               sequence_parallel: bool, dtype_bytes: int) -> float:
    """Activations one block keeps for its backward, for one micro-batch, per device.

    Per token: the two norm inputs and outputs (4d), q and the attention output (2q, q =
    heads x head size), k and v (2*kv), the four d_ff-wide MLP tensors (4f) in the compute
    dtype, plus q and k before rotation in fp32 (q + kv). Attention itself (SDPA, flash or
    memory-efficient) keeps no seq x seq matrix. Tensor parallelism divides the sharded
    tensors by tp, and sequence parallelism the rest too.
    """
    d, f, kv = shape.d_model, shape.ffn_hidden, shape.n_kv_heads * shape.head_dim
    q = shape.n_heads * shape.head_dim  # d, unless the head size is set apart (Qwen3)
    sharded = (2 * q + 2 * kv + 4 * f) * dtype_bytes + (q + kv) * 4
    replicated = 4 * d * dtype_bytes
    per_token = sharded / tp + replicated / (tp if sequence_parallel else 1)
    return per_token * micro_batch * seq_len


def selective_bytes_per_layer(shape: GPTShape, micro_batch: int, seq_len: int, tp: int,
                              sequence_parallel: bool, dtype_bytes: int) -> float:
    """Activations a selectively recomputed block keeps: its input, and the outputs of
    its matmuls and of attention. Per token: q, k, v, the attention output and SwiGLU's
    two up-projections (2q + 2kv + 2f, split by tp), the two projections back to the
    residual stream (2d, whole on each rank before tensor parallelism's reduction)."""
    d, f, kv = shape.d_model, shape.ffn_hidden, shape.n_kv_heads * shape.head_dim
    q = shape.n_heads * shape.head_dim
    block_input = d / (tp if sequence_parallel else 1)
    per_token = ((2 * q + 2 * kv + 2 * f) / tp + 2 * d + block_input) * dtype_bytes
    return per_token * micro_batch * seq_len


@dataclass(frozen=True)
class MemoryPlan:
    params: int  # on the device's stage, before tensor parallelism
    held: int  # parameter elements the device holds (its shards); as many gradients
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    activations: float  # as configured (with the chosen recomputation)
    activations_no_recompute: float
    activations_full_recompute: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def loss_logits_bytes(shape: GPTShape, tokens: int, tp: int) -> float:
    """The fp32 logits and their gradient that exist at once in the loss of `tokens`
    tokens: a chunk's (`row_losses`), or, under tensor parallelism, all of them split
    over the vocabulary."""
    at_once = tokens if tp > 1 else min(tokens, max(1, LOSS_CHUNK_ELEMENTS // shape.vocab_size))
    return at_once * shape.vocab_size * 4 * 2 / tp


def ring_exchange_bytes(shape: GPTShape, layers: int, tokens: int, cp: int, tp: int,
                        compute_bytes: int) -> float:
    """Bytes one context-parallel rank sends per step through `layers` layers, for the
    `tokens` tokens of its replica's sequences in the step: forward, its key/value share
    of each sequence goes round the ring (cp - 1 sends); backward, the blocks go round
    again (cp sends) with their fp32 gradients. Its tensor-parallel rank's heads only;
    the positions and sample ids beside them (8 bytes a token) are not counted."""
    if cp == 1:
        return 0.0
    block = tokens / cp * 2 * shape.n_kv_heads * shape.head_dim / tp  # k and v elements
    return layers * block * ((cp - 1) * compute_bytes + cp * (compute_bytes + 4))


def in_flight_microbatches(schedule: str, pp: int, pp_rank: int, microbatches: int,
                           virtual_stages: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak: all of them in
    GPipe; pp - rank in 1F1B (the first rank holds most); scaled by 1 + (p-1)/(p*v) when
    interleaved (Narayanan et al. 2021); pp on every rank of the zero-bubble V, whose two
    stages per rank balance it."""
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return microbatches
    if schedule == "zero-bubble":
        return min(pp, microbatches)
    held = min(pp - pp_rank, microbatches)
    if schedule == "interleaved-1f1b":
        return held * (1 + (pp - 1) / (pp * virtual_stages))
    return held


def piece(size: int, parts: int, index: int) -> int:
    """The length of piece `index` of `size` split `parts` ways as DTensor and FSDP split
    a dimension (torch.chunk): pieces of ceil(size / parts), the last shorter or empty."""
    length = -(-size // parts)
    return max(0, min(length, size - index * length))


@dataclass(frozen=True)
class Shards:
    """Which shards one device holds: its tensor-parallel and data-parallel-shard ranks."""

    tp: int = 1
    tp_rank: int = 0
    dp_shard: int = 1  # ranks FSDP shards over (1 with DDP)
    dp_shard_rank: int = 0

    def held(self, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """(elements after tensor parallelism, elements the device holds after FSDP too)
        of parameter `name`: tensor parallelism splits its `tensor_parallel_dim`, FSDP
        then splits dim 0 of what is left."""
        local = list(shape)
        dim = tensor_parallel_dim(name)
        if dim is not None:
            local[dim] = piece(local[dim], self.tp, self.tp_rank)
        tp_local = math.prod(local)
        local[0] = piece(local[0], self.dp_shard, self.dp_shard_rank)
        return tp_local, math.prod(local)


def memory_plan(shape: GPTShape, params: int, tp_local: int, held: int, stage_layers: int,
                last: bool, *, dp: int, tp: int, dp_shard: str, sequence_parallel: bool,
                micro_batch: int, seq_len: int, in_flight: float, recompute_every: int,
                compute_bytes: int, selective: bool = False, trained: int | None = None
                ) -> MemoryPlan:
    """Memory of a device holding `held` of its stage's `params` parameters (`tp_local`
    before FSDP's sharding): fp32 master weights, gradients and AdamW state of what it
    holds (of the `trained` part of it alone: a LoRA run's base has neither), plus the
    activations of the micro-batches in flight."""
    weights = held * MASTER_BYTES
    if dp_shard == "grad-op" and dp > 1:  # ZeRO-2: gathered weights stay from forward to backward
        weights += tp_local * compute_bytes
    gradients = (held if trained is None else trained) * GRADIENT_BYTES
    optimizer = (held if trained is None else trained) * OPTIMIZER_BYTES
    layer = activation_bytes_per_layer(shape, micro_batch, seq_len, tp, sequence_parallel,
                                       compute_bytes)
    block_input = micro_batch * seq_len * shape.d_model * compute_bytes / (
        tp if sequence_parallel else 1)
    logits = loss_logits_bytes(shape, micro_batch * seq_len, tp) if last else 0
    no_recompute = in_flight * stage_layers * layer + logits
    full = in_flight * stage_layers * block_input + layer + logits  # + one layer recomputed
    if selective:  # every layer, each keeping its matmul outputs
        chosen = in_flight * stage_layers * selective_bytes_per_layer(
            shape, micro_batch, seq_len, tp, sequence_parallel, compute_bytes) + layer + logits
    elif recompute_every:
        kept = stage_layers - -(-stage_layers // recompute_every)  # layers not recomputed
        recomputed = stage_layers - kept
        chosen = in_flight * (kept * layer + recomputed * block_input) + layer + logits
    else:
        chosen = no_recompute
    return MemoryPlan(params, held, weights, gradients, optimizer, chosen, no_recompute, full)

