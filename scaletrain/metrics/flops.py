"""Count the FLOPs of one training step by running the model under `FlopCounterMode`.

Counting is meant to happen on the **meta device**: build the model under
`torch.device("meta")` (as recipes already do), make meta inputs of the per-rank micro-batch
shape, and call `count_train_flops`. Meta tensors carry shapes but no storage, so a 70B
model is counted on a laptop CPU in seconds and nothing is allocated. A real-device model
works too; the numbers are identical (the tests check it).

What is counted is what `torch.utils.flop_counter` has formulas for: matmuls (mm, addmm,
bmm, baddbmm, scaled mm), convolutions and their backward, and the fused attention kernels
(flash / efficient / cuDNN / flex). Elementwise ops, norms and softmax count zero — the
usual convention for MFU, where they are a rounding error next to the matmuls. Two
consequences worth knowing:

* causal attention counts as full attention (the counter does not halve it), which is
  also what most published MFU numbers assume;
* count without activation checkpointing: MFU is defined on *model* FLOPs, and recompute
  would add a second forward (that would be hardware FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _floating_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor inside a (nested) tuple / list / dict / model-output object."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _floating_tensors(value)
    elif isinstance(obj, (tuple, list)):
        for value in obj:
            yield from _floating_tensors(value)


def _default_loss(output: Any) -> torch.Tensor:
    """Sum of every floating output that is part of the autograd graph, in fp32."""
    parts = [t.float().sum() for t in _floating_tensors(output) if t.requires_grad]
    if not parts:
        raise ValueError(
            "count_train_flops: the model output has no floating tensor that requires grad; "
            "pass loss_fn=... that maps the output to a scalar loss."
        )
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _as_tuple(inputs: Any) -> tuple:
    # A lone tensor is a common slip for `(tensor,)`; accept it rather than unpack its rows.
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def count_forward_flops(model: nn.Module, inputs: tuple, kwargs: dict[str, Any] | None = None) -> int:
    """FLOPs of one forward of `model(*inputs, **kwargs)`, without building an autograd graph."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*_as_tuple(inputs), **(kwargs or {}))
    return int(counter.get_total_flops())


def count_train_flops(
    model: nn.Module,
    inputs: tuple,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> int:
    """FLOPs of one forward + backward of `model(*inputs, **kwargs)`.

    `loss_fn` maps the model output to a scalar; by default the fp32 sum of every floating
    output that requires grad. Inputs that do not require grad get no input-gradient matmul
    (autograd skips it), so a first Linear on raw data costs 2x its forward in backward,
    not 3x — the count follows what autograd really runs.

    The model's `.grad` fields are left exactly as they were before the call (gradients
    already accumulated on a real model are restored, new ones are dropped), so calling
    this mid-training is safe. For MFU, multiply by gradient-accumulation steps and by the
    number of data-parallel replicas to get the FLOPs of one global optimizer step.
    """
    inputs = _as_tuple(inputs)
    # Leaves whose .grad backward would touch: the parameters and any leaf inputs that
    # require grad. Detach their current grads first (backward accumulates *in place* into
    # an existing .grad, so restoring the same object afterwards would not undo it).
    leaves = list(model.parameters()) + [t for t in _floating_tensors(inputs) if t.is_leaf and t.requires_grad]
    saved_grads = [t.grad for t in leaves]
    for leaf in leaves:
        leaf.grad = None
    counter = FlopCounterMode(display=False)
    try:
        with torch.enable_grad(), counter:
            output = model(*inputs, **(kwargs or {}))
            loss = loss_fn(output) if loss_fn is not None else _default_loss(output)
            if loss.numel() != 1:
                raise ValueError(f"count_train_flops: loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            loss.backward()
    finally:
        for leaf, grad in zip(leaves, saved_grads, strict=True):
            leaf.grad = grad
    return int(counter.get_total_flops())
