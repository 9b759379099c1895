"""How the GPT recipe is parallelized: TP(+SP) -> CP -> EP -> activation checkpointing -> compile -> FSDP2/DDP.

Tensor parallel follows Megatron's split: q/k/v and w1/w3 column-wise (each rank owns a
slice of heads / hidden units), wo and w2 row-wise (partial sums reduced once per
sub-block). Sequence parallel shards the norms' inputs along the sequence, so the
all-reduce after wo/w2 becomes a reduce-scatter and the all-gather moves to the start of
the next sub-block — same traffic, 1/tp of the norm activations. With loss parallel the
logits stay sharded over the vocabulary and cross-entropy reduces across tp ranks, so no
rank ever holds [B, T, V].
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from scaletrain.config.schema import JobConfig
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.parallel.context_parallel import attention_function, load_balanced_positions
from scaletrain.parallel.expert_parallel import apply_expert_parallel
from scaletrain.recipes.gpt.model import GPT
from scaletrain.recipes.gpt.moe import MoE
from scaletrain.validate import uses_loss_parallel


def apply_tensor_parallel(model: GPT, dims: ParallelDims, loss_parallel: bool) -> None:
    tp_mesh = dims.axis("tp")
    learned_pos = model.pos_embeddings is not None
    root_plan = {
        # Llama: the embedding's output goes straight to sequence-sharded. GPT-2 adds the
        # position table first, so its sum stays replicated until the first block.
        "tok_embeddings": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Replicate() if learned_pos else Shard(1)
        ),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    parallelize_module(model, tp_mesh, root_plan)
    if learned_pos:
        # The position table is small: replicate it over tp (as a DTensor, so every
        # parameter lives on the tp mesh and FSDP/grad-norm see one layout).
        distribute_module(
            model.pos_embeddings,
            tp_mesh,
            input_fn=lambda mod, inputs, mesh: tuple(DTensor.from_local(x, mesh, [Replicate()]) for x in inputs),
            output_fn=lambda mod, out, mesh: out.to_local(),
        )
    for index, block in model.layers.items():
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if block.attention.q_norm is not None:
            # Qwen3's per-head norms: one weight shared by the heads, which tp splits (dim 2 of B T H E).
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if isinstance(block.feed_forward, MoE):
            plan.update(_moe_plan(block.feed_forward))
            block.feed_forward.tp_group = tp_mesh.get_group()
        else:
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan["feed_forward.w1"] = ColwiseParallel()
            plan["feed_forward.w2"] = RowwiseParallel(output_layouts=Shard(1))
            if block.feed_forward.w3 is not None:
                plan["feed_forward.w3"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        if learned_pos and index == "0":
            # Turn the replicated embedding sum into the sequence shard the first norm expects.
            parallelize_module(
                block,
                tp_mesh,
                PrepareModuleInput(
                    input_layouts=(Replicate(), None, None),
                    desired_input_layouts=(Shard(1), None, None),
                    use_local_output=True,
                ),
            )


def _moe_plan(moe: MoE) -> dict:
    """An MoE block under TP keeps its input sharded over the sequence: each tp rank routes its own tokens,
    which then go to the experts like any data-parallel rank's (the routed experts are not split over tp;
    their FSDP group includes the tp ranks, which sums their gradients). The router is replicated over tp
    (DTensor sums its gradient over the ranks); the shared experts are split Megatron-style, on all tokens."""
    plan = {
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True
        ),
        # MoE.route flattens the tokens: the local [B*T/tp, D] rows are shard 0 of all the rows.
        "feed_forward.router": SequenceParallel(sequence_dim=0, use_local_output=True),
    }
    if moe.shared is not None:
        plan["feed_forward.shared"] = PrepareModuleInput(
            input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),)
        )
        plan["feed_forward.shared.w1"] = ColwiseParallel()
        plan["feed_forward.shared.w3"] = ColwiseParallel()
        plan["feed_forward.shared.w2"] = RowwiseParallel(output_layouts=Shard(0))
    return plan


def apply_context_parallel(model: GPT, dims: ParallelDims, method: str, attention_impl: str) -> None:
    """Sequence-sharded attention and the matching global positions for RoPE / position tables."""
    cp_mesh = dims.axis("cp")
    group, rank, cp = cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size()
    # Ring chunk pairs run through the flash-attention kernel when the model uses it (it returns
    # the log-sum-exp the ring merges by), else through plain ops.
    block_impl = "triton" if attention_impl == "triton" else "eager"
    attention = attention_function(method, group, block_impl)

    def positions(local_len: int, device: torch.device) -> torch.Tensor:
        return load_balanced_positions(local_len, rank, cp, device)

    for block in model.layers.values():
        block.attention.attention_fn = attention
        block.attention.positions_fn = positions
        if isinstance(block.feed_forward, MoE):  # its sequence-wise balancing loss counts whole sequences
            block.feed_forward.cp_group = group
    model.positions = positions


def parallelize_gpt(model: GPT, dims: ParallelDims, cfg: JobConfig, attention_impl: str) -> GPT:
    """The GPT plan; `attention_impl` is the resolved model.attention (scaletrain/recipes/gpt/__init__.py)."""
    blocks = list(model.layers.values())
    moe_layers = [block.feed_forward for block in blocks if isinstance(block.feed_forward, MoE)]
    experts = [layer.experts for layer in moe_layers]
    if dims.tp_enabled:
        apply_tensor_parallel(model, dims, loss_parallel=uses_loss_parallel(cfg, dims))
    if dims.cp_enabled:
        apply_context_parallel(model, dims, cfg.parallel.cp_method, attention_impl)
    if dims.ep_enabled:
        ep_mesh = dims.axis("ep")
        apply_expert_parallel(experts, ep_mesh)
        for layer in moe_layers:
            layer.ep_group = ep_mesh.get_group()
    return checkpoint_compile_and_shard(model, blocks, dims, cfg, experts=experts)
