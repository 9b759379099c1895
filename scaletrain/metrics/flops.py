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
from torch.utils.flop_counter import FlopCounterMode, flop_registry


def _attention_fwd_flops(q_shape, k_shape, v_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """QK^T plus attention @ V, full (non-causal) like torch's own SDPA formulas; GQA-aware."""
    batch, heads, s_q, d_qk = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * batch * heads * s_q * s_k * (d_qk + d_v)


def _attention_bwd_flops(grad_shape, q_shape, k_shape, v_shape, *args: Any, **kwargs: Any) -> int:
    """dV, dP, dQ and dK: four matmuls of forward size, i.e. twice the forward."""
    return 2 * _attention_fwd_flops(q_shape, k_shape, v_shape)


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for ops torch's counter has none for (on the torch versions we support).

    The CPU SDPA kernel is the one that matters: without it a real-CPU count of any
    attention model misses all attention FLOPs, and would disagree with the meta count
    (which decomposes SDPA into counted bmms). Torch's own formula wins if it has one.
    """
    aten = torch.ops.aten
    extra: dict[Any, Callable[..., int]] = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _attention_fwd_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_bwd_flops),
    ):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_registry:
            extra[op] = formula
    return extra


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_extra_formulas())


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
    counter = _counter()
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
    counter = _counter()
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
