"""Activation checkpointing: none, full (every block), every N-th block, or op-level selective.

Neither way wraps the block in another module, so parameter names stay the same with and
without checkpointing (checkpoints and the name-seeded init do not see a difference):
full and every-N-th use the composable `checkpoint` API, which hooks the module; op-level
selective checkpoints the block's forward method (see _checkpoint_forward for why).

Op-level selective saves the outputs of the expensive ops (matmuls, attention) and
recomputes the cheap elementwise ones in backward — most of the memory saving of full
checkpointing for a small fraction of its recompute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as checkpoint_function

from scaletrain.config.schema import ActivationCheckpointSection

# Ops whose outputs are kept: recomputing them costs real FLOPs.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _SAVE_OPS.add(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_level_context():
    return create_selective_checkpoint_contexts(_policy)


def _checkpoint_forward(block: nn.Module) -> None:
    """Op-level selective checkpointing of `block.forward`, with every module hook outside the region.

    The composable `checkpoint` recomputes by calling the module again, hooks included. FSDP2's
    pre-forward hook, which in forward ran before checkpointing began, then runs inside the
    recompute, and its profiler ops are missing from what selective checkpointing cached:
    "profiler._record_function_enter_new ... encountered during backward but not found in
    storage". Checkpointing the forward method (as torch's checkpoint_wrapper does, without a
    wrapper module that would rename the parameters) keeps FSDP's hooks out of both passes.
    """
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        return checkpoint_function(forward, *args, use_reentrant=False, context_fn=_op_level_context, **kwargs)

    block.forward = checkpointed_forward


def parse_selective(value: str) -> int | None:
    """'op' -> None (op-level); 'N' -> every N-th block. Raises naming the field."""
    if value == "op":
        return None
    try:
        every = int(value)
    except ValueError:
        every = 0
    if every < 1:
        raise ValueError(f"activation_checkpoint.selective: {value!r} is not allowed; use 'op' or a positive integer")
    return every


def apply_activation_checkpointing(blocks: Sequence[nn.Module], cfg: ActivationCheckpointSection) -> int:
    """Checkpoint the given repeated blocks in place; returns how many were checkpointed."""
    if cfg.mode == "none":
        return 0
    every = parse_selective(cfg.selective) if cfg.mode == "selective" else 1
    count = 0
    for index, block in enumerate(blocks):
        if every is None:
            _checkpoint_forward(block)
        elif index % every == 0:
            checkpoint(block)
        else:
            continue
        count += 1
    return count
