"""How the diffusion models are parallelized: TP -> activation checkpointing -> compile -> FSDP2/DDP.

DiT tensor parallel follows the GPT's Megatron split inside each block: q/k/v and fc1
column-wise (each rank owns n_heads/tp heads and F/tp hidden units), wo and fc2 row-wise
(one all-reduce per branch). The adaLN regressor (6*D outputs per block, a third of
DiT-XL's weights) is split column-wise and all-gathered, so its weights are sharded too.
Sequence parallel is not used (tokens are few: 256 for DiT-XL/2 at 256 px).

Every other parameter (patch embedding, timestep/class embedders, final layer) is
replicated over tp as a DTensor, so that all parameters live on the tp mesh and FSDP and
the gradient norm see one layout (as in scaletrain/recipes/gpt/parallelize.py).

The U-Net and the VAE are data parallel only (DDP or FSDP2 per residual/attention block).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from scaletrain import ops
from scaletrain.config.schema import TORCH_DTYPES, JobConfig
from scaletrain.distributed import training_device_type
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.recipes.diffusion.dit import DiT


def _replicate_on(module: nn.Module, mesh) -> None:
    """Make `module`'s parameters tp-replicated DTensors; its inputs/outputs stay plain tensors."""
    distribute_module(
        module,
        mesh,
        input_fn=lambda mod, inputs, m: tuple(
            DTensor.from_local(x, m, [Replicate()], run_check=False) if hasattr(x, "dim") else x for x in inputs
        ),
        output_fn=lambda mod, out, m: out.to_local(),
    )


def apply_tensor_parallel(model: DiT, dims: ParallelDims) -> None:
    tp_mesh = dims.axis("tp")
    for block in model.blocks.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "mlp.fc1": ColwiseParallel(),
            "mlp.fc2": RowwiseParallel(),
            # Gathered back to the full 6*D: the chunk into shift/scale/gate needs all of it.
            "adaln": ColwiseParallel(output_layouts=Replicate()),
        }
        parallelize_module(block, tp_mesh, plan)
    # Pipeline stages hold only some of these (the embedders on the first, the final layer on the last).
    replicated = []
    if model.patch_embed is not None:
        replicated += [model.patch_embed, model.t_embedder.fc1, model.t_embedder.fc2, model.y_embedder]
    if model.final is not None:
        replicated += [model.final.adaln, model.final.linear]
    for module in replicated:
        if module is not None:  # no class embedder when unconditional
            _replicate_on(module, tp_mesh)


def attention_tokens(cfg: JobConfig) -> int | None:
    """The sequence length every attention module sees: the DiT's patch count; None for the U-Net, which
    attends at several resolutions."""
    patch = getattr(cfg.model, "patch_size", None)
    return (cfg.model.image_size // patch) ** 2 if patch else None


def _attention_choices(
    model: nn.Module, cfg: JobConfig, tokens: int | None
) -> list[tuple[nn.Module, ops.AttentionChoice]]:
    """(module, resolved model.attention) for every attention module (those with an `attention_fn` and a
    `head_dim`): the same answer wherever it is asked, so installing and reporting agree."""
    return [
        (
            module,
            ops.resolve_attention(
                cfg.model.attention,
                device_type=training_device_type(),
                dtype=TORCH_DTYPES[cfg.train.dtype],
                head_dim=module.head_dim,
                seq_len=tokens,
            ),
        )
        for module in model.modules()
        if hasattr(module, "attention_fn")
    ]


def resolve_attention(model: nn.Module, cfg: JobConfig, tokens: int | None) -> None:
    """Resolve model.attention (e.g. auto) once for this device and install it in every attention module,
    so all blocks and ranks run the same implementation (reported by `startup_notes`)."""
    for module, choice in _attention_choices(model, cfg, tokens):
        module.attention_fn = ops.attention_fn(choice.impl, causal=False)


def startup_notes(model: nn.Module, cfg: JobConfig, dims: ParallelDims) -> list[str]:
    """The start-up "kernels:" line: the attention choice (when the model has attention), then `fused: norm
    (<backend>)` when model.fused_norm is on (the DiT's LayerNorm + modulate, the U-Net's and the VAE's
    GroupNorm + SiLU kernels); no line if both are empty."""
    choices = _attention_choices(model, cfg, attention_tokens(cfg))
    described = {choice.describe(cfg.model.attention): None for _, choice in choices}  # ordered, no repeats
    parts = [f"attention {', '.join(described)}"] if described else []
    if getattr(cfg.model, "fused_norm", False):
        device = torch.device(training_device_type())
        parts.append(f"fused: norm ({ops.fused_backend(torch.empty(0, device=device))})")
    return [f"kernels: {' | '.join(parts)}"] if parts else []


def parallelize_dit(model: DiT, dims: ParallelDims, cfg: JobConfig) -> DiT:
    resolve_attention(model, cfg, attention_tokens(cfg))
    blocks = list(model.blocks.values())
    if dims.tp_enabled:
        apply_tensor_parallel(model, dims)
    return checkpoint_compile_and_shard(model, blocks, dims, cfg)


def parallelize_blocks(model: nn.Module, dims: ParallelDims, cfg: JobConfig) -> nn.Module:
    """Data-parallel-only plan for models that list their repeated blocks in `model.fsdp_blocks()` (tp > 1 is
    refused before this runs: the U-Net and the VAE do not declare Recipe.supports.tensor_parallel)."""
    resolve_attention(model, cfg, attention_tokens(cfg))  # the U-Net's; the VAE has no attention modules
    blocks = list(model.fsdp_blocks())
    return checkpoint_compile_and_shard(model, blocks, dims, cfg)
