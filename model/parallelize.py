"""Applies parallelism to a plain GPT (or a pipeline stage of it) from outside.

In this order: tensor + sequence parallelism on the `tp` mesh, context parallelism
(the group each sequence is split over, for ring attention), activation
checkpointing, then data parallelism with FSDP2 on the data-parallel mesh. The
pipeline split happens before (`pipeline.py`); the model file knows none of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from raytron.model.gpt import GPT


@dataclass(frozen=True)
class ParallelOptions:
    sequence_parallel: bool = True
    loss_parallel: bool = True  # keep the logits sharded over the vocabulary for the loss
    activation_checkpointing: int = 0  # checkpoint every k-th layer; 0: none, 1: all
    selective_recompute: bool = False  # checkpointed layers keep their matmul outputs
    compile: bool = False  # torch.compile each block
    dp_shard: str = "full"  # full (ZeRO-3) | grad-op (ZeRO-2) | none (DDP)
    param_dtype: torch.dtype | None = None  # FSDP all-gathers in this dtype (bf16 on GPU)


# A block's linear layers as tensor parallelism splits them (Megatron): column-parallel
# ones hold a slice of the output features (weight dim 0), row-parallel ones of the input
# features (dim 1). The embedding and the head are split along the vocabulary (dim 0).
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1",
                   "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def tensor_parallel_dim(name: str) -> int | None:
    """The dimension of parameter `name` that tensor parallelism splits; None for the
    ones every rank of a tensor-parallel group holds whole (the norms)."""
    module, kind = name.rsplit(".", 1)
    if module in ("tok_embeddings", "output"):
        return 0
    if module.endswith(COLUMN_PARALLEL):
        return linear_split_dim("column", kind)
    return linear_split_dim("row", kind) if module.endswith(ROW_PARALLEL) else None


def linear_split_dim(kind: str, param: str) -> int | None:
    """Which dim of a column- or row-parallel layer's `param` is split. Column-parallel:
    the weight's, the bias's and a LoRA adapter's B's output rows (its A stays whole, as
    the layer's input does). Row-parallel: the weight's and A's input columns (B and the
    bias, which are applied after the partial sums, stay whole)."""
    if kind == "column":
        return None if param == "lora_a" else 0
    return 1 if param in ("weight", "lora_a") else None


class ColumnParallel(ColwiseParallel):
    """ColwiseParallel that splits a LoRA adapter too (`linear_split_dim`)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        split_linear(module, device_mesh, "column", self.src_data_rank)


class RowParallel(RowwiseParallel):
    """RowwiseParallel that splits a LoRA adapter too (`linear_split_dim`)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        split_linear(module, device_mesh, "row", self.src_data_rank)


def split_linear(module: nn.Module, mesh: DeviceMesh, kind: str, src_data_rank: int | None
                 ) -> None:
    for name, param in list(module.named_parameters()):
        dim = linear_split_dim(kind, name)
        split = distribute_tensor(param, mesh, [Replicate() if dim is None else Shard(dim)],
                                  src_data_rank=src_data_rank)
        module.register_parameter(name, nn.Parameter(split, requires_grad=param.requires_grad))


def parallelize(model: GPT, tp_mesh: DeviceMesh | None, dp_mesh: DeviceMesh | None,
                options: ParallelOptions, cp_mesh: DeviceMesh | None = None) -> GPT:
    """`model` with every requested parallelism applied in place; meshes of size 1 are
    skipped. Under context parallelism (`cp_mesh`) the model is called with each rank's
    share of the sequences and where they lie (`order`); FSDP's `dp_mesh` then spans
    the context-parallel ranks too."""
    if tp_mesh is not None and tp_mesh.size() > 1:
        frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
        apply_tensor_parallel(model, tp_mesh, options)
        for name, param in model.named_parameters():  # SequenceParallel's new parameters
            param.requires_grad_(name not in frozen)  # all require gradients
    if cp_mesh is not None and cp_mesh.size() > 1:
        model.context_group = cp_mesh.get_group()
    if options.activation_checkpointing:
        apply_activation_checkpointing(model, options.activation_checkpointing,
                                       options.selective_recompute)
    if options.compile:
        apply_compile(model)
    if dp_mesh is not None and dp_mesh.size() > 1:
        apply_data_parallel(model, dp_mesh, options)
    return model


def apply_tensor_parallel(model: GPT, tp_mesh: DeviceMesh, options: ParallelOptions) -> None:
    """Megatron's split: q/k/v and MLP up/gate column-parallel, the output projections
    row-parallel; vocab-parallel embedding and head. With sequence parallelism the
    norms and residual stream are sharded along the sequence between the blocks."""
    sp = options.sequence_parallel
    between = Shard(1) if sp else Replicate()  # layout of the residual stream
    # the head's output is split over the vocabulary: its loss is not cut into chunks of
    # tokens too (a sequence-sharded input would need gathering per chunk)
    model.loss_chunk_tokens = None
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                     output_layouts=between)
    if model.norm is not None and sp:
        top_plan["norm"] = SequenceParallel()
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(
            input_layouts=between,
            output_layouts=Shard(-1) if options.loss_parallel else Replicate(),
            use_local_output=not options.loss_parallel,
        )
    parallelize_module(model, tp_mesh, top_plan)
    model.tie_weights()  # both sharded along the vocabulary: one DTensor serves both
    for block in model.layers.values():
        plan = {
            # inputs: x, the rotary tables, the mask's description, the KV cache (None here)
            "attention": PrepareModuleInput(input_layouts=(between, None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None,
                                                                   None, None)),
            "feed_forward": PrepareModuleInput(input_layouts=(between,),
                                               desired_input_layouts=(Replicate(),)),
            **{name: ColumnParallel() for name in COLUMN_PARALLEL},
            **{name: RowParallel(output_layouts=between) for name in ROW_PARALLEL},
        }
        if sp:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        if isinstance(block.attention.q_norm, nn.RMSNorm):
            # per-head norms (batch, seq, heads, head_dim): each rank normalizes its own
            # heads, and the gains' gradients are summed over the ranks
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)


def apply_activation_checkpointing(model: GPT, every: int, selective: bool = False) -> None:
    """Recompute every `every`-th block in the backward pass instead of storing its
    activations (the checkpoint wrapper keeps parameter names for checkpoints). With
    `selective`, the block keeps the outputs of its matmuls and of attention, and
    recomputes only the cheap element-wise ops (norms, rotary, SwiGLU's product,
    residual adds): most of the memory saved for little recomputation."""
    context = partial(create_selective_checkpoint_contexts, keep_matmul_outputs) \
        if selective else noop_context_fn
    for index, name in enumerate(list(model.layers)):
        if index % every == 0:
            model.layers[name] = checkpoint_wrapper(model.layers[name], context_fn=context,
                                                    preserve_rng_state=False)


# Ops whose outputs a selectively recomputed block keeps (torchtitan's list, less its
# every-other-matmul trick): the expensive ones. The rest is recomputed.
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    # FlexAttention (masked attention on CUDA): the policy sees this op where dynamo
    # traces the block (train.compile). In an eager block the compiled flex_attention
    # is an opaque region whose fused kernel no policy sees: it is recomputed.
    torch.ops.higher_order.flex_attention,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
}


def keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_compile(model: GPT) -> None:
    """`torch.compile` each block on its own (torchtitan's way): the blocks are alike,
    so one compilation serves all, and the embedding, the head, the pipeline's cuts,
    FSDP's hooks and the checkpoint wrapper stay outside the compiled graphs. Applied
    after tensor parallelism and recomputation, before FSDP. Parameter names gain an
    `_orig_mod.` that checkpoints and initial values ignore."""
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=True)


def apply_data_parallel(model: GPT, dp_mesh: DeviceMesh, options: ParallelOptions) -> None:
    """FSDP2 over `dp_mesh` (2-D: replicate x shard): each block is its own unit so its
    all-gather overlaps the previous block's compute; the root holds the rest.

    `full` frees gathered weights after the forward (ZeRO-3); `grad-op` keeps them
    until the backward (ZeRO-2: only gradients and optimizer state stay sharded);
    `none` uses a shard dimension of 1, which is DDP: replicas all-reduce gradients.
    """
    policy = MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=torch.float32)
    reshard = options.dp_shard == "full"
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
