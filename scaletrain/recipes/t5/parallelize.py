"""How the T5 recipe is parallelized: TP -> activation checkpointing -> compile -> FSDP2/HSDP/DDP.

Tensor parallel (Megatron's split, as the GPT recipe's): in every self- and cross-attention q, k and v are
column-wise (each rank computes H/tp heads) and o row-wise (one all-reduce per sub-block); in every MLP wi
(or wi_0 and wi_1) column-wise and wo row-wise. The relative-position-bias table [buckets, H] is split by
heads (column-wise on the embedding), so each rank looks up exactly the bias of its own heads and no rank
holds another's. The shared embedding (also the tied head) is replicated over tp as a DTensor, so every
parameter lives on the tp mesh; an untied lm_head is column-wise over the vocabulary with its logits
gathered. No sequence parallel: the norms see the full sequence on every tp rank (their gradients are then
equal on all of them, as each rank's residual stream is).
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from scaletrain.config.schema import JobConfig
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.recipes.t5.model import T5


def _attention_plan(prefix: str) -> dict:
    return {
        f"{prefix}.q": ColwiseParallel(),
        f"{prefix}.k": ColwiseParallel(),
        f"{prefix}.v": ColwiseParallel(),
        f"{prefix}.o": RowwiseParallel(),
    }


def block_plan(gated: bool, cross_attention: bool) -> dict:
    """The TP plan of one encoder (cross_attention False) or decoder block."""
    plan = _attention_plan("attention")
    if cross_attention:
        plan.update(_attention_plan("cross_attention"))
    inputs = ("feed_forward.wi_0", "feed_forward.wi_1") if gated else ("feed_forward.wi",)
    plan.update({name: ColwiseParallel() for name in inputs})
    plan["feed_forward.wo"] = RowwiseParallel()
    return plan


def apply_tensor_parallel(model: T5, dims: ParallelDims) -> None:
    tp_mesh = dims.axis("tp")
    distribute_module(  # replicated: token ids in as a replicated DTensor, embeddings out as the local tensor
        model.shared,
        tp_mesh,
        input_fn=lambda mod, inputs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()]) for x in inputs),
        output_fn=lambda mod, out, mesh: out.to_local(),
    )
    if model.lm_head is not None:
        parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    gated = model.cfg.mlp == "gated-gelu"
    for stack in (model.encoder, model.decoder):
        # Embedding weight [buckets, H] split on dim 1 (heads); the output [T, T, H/tp] stays local.
        parallelize_module(stack.relative_bias, tp_mesh, ColwiseParallel())
        for block in stack.layers.values():
            parallelize_module(block, tp_mesh, block_plan(gated, cross_attention=stack.decoder))


def parallelize(model: T5, dims: ParallelDims, cfg: JobConfig) -> T5:
    blocks = model.blocks()
    if dims.tp_enabled:
        apply_tensor_parallel(model, dims)
    return checkpoint_compile_and_shard(model, blocks, dims, cfg)
