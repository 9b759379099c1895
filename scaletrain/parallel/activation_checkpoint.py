"""Activation checkpointing: none, full (every block), every N-th block, or op-level selective.

Uses the composable `checkpoint` API, which hooks the module instead of wrapping it, so
parameter names stay the same with and without checkpointing (checkpoints and the
name-seeded init do not see a difference).

Op-level selective saves the outputs of the expensive ops (matmuls, attention) and
recomputes the cheap elementwise ones in backward — most of the memory saving of full
checkpointing for a small fraction of its recompute.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

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
    every = 1
    context_fn = None
    if cfg.mode == "selective":
        every_n = parse_selective(cfg.selective)
        if every_n is None:
            context_fn = _op_level_context
        else:
            every = every_n
    count = 0
    for index, block in enumerate(blocks):
        if index % every:
            continue
        if context_fn is not None:
            checkpoint(block, context_fn=partial(context_fn))
        else:
            checkpoint(block)
        count += 1
    return count
