"""DTensor sharding rules for the kernel ops, so they run on DTensor inputs shard by shard.

Tensor parallel hands some ops DTensors: with sequence parallel the norms see activations sharded over
the sequence dim, and a plan that keeps the attention heads as DTensors shards those over the heads. DTensor
dispatches each ``scaletrain_kernels`` op through the rules below: it redistributes the inputs to one of
the listed placements (cheapest first), runs the op on the local shards (the Triton kernel, unchanged) and
wraps the results with the output placements. Each rule is one (output placements, input placements) pair
per mesh dim; ``None`` marks a non-tensor argument. DTensor expands them over every mesh dim.

Why these rules are exact:
  rms_norm     normalizes each row over the last dim, so any shard of the other dims is pointwise; the
               weight is replicated. Its gradient sums dy * x_hat over every row, and a rank holds only its
               rows, so the local dweight is a partial sum: ``Partial()`` (DTensor all-reduces it when a
               replicated value is needed, as for torch's own rms_norm).
  layer_norm   like rms_norm: rows are independent, weight and bias replicated, their gradients Partial.
               With adaLN modulate (x [B, ..., N], shift / scale [B, N]) the batch dim 0 may be sharded if
               shift and scale share it (their gradients then too); any other row dim needs them replicated,
               and their gradients (sums over the rows of each b) become Partial. The gradient slots of
               absent optional inputs (empty placeholders) get the same placements, so the rule does not
               depend on which of weight / bias is present.
  swiglu       elementwise: any shard, as long as gate, up and their gradients share it.
  attention    independent per batch row and per head: shard dim 0 (batch) or 1 (heads) of q/k/v, out,
               lse and the gradients alike. With grouped-query heads both head counts must be divisible by
               the mesh size, so that each rank's query heads read exactly its kv heads (contiguous chunks).
  rope         q/k [B, T, H, D] may be sharded over batch (0) or heads (2); cos/sin (indexed by position)
               must be replicated DTensors then.
Sequence-sharded attention is context parallel, a different algorithm, not a sharding rule.

Registered on import of ``scaletrain.kernels`` when torch.distributed is available (torch >= 2.5 has
``register_sharding``); without it, DTensor inputs raise DTensor's usual "no sharding strategy" error.
"""

from __future__ import annotations

import torch


def register() -> bool:
    """Register every rule; returns False when this torch has no DTensor / register_sharding."""
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import Partial, Replicate, Shard
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:
        return False
    ops = torch.ops.scaletrain_kernels
    R = Replicate()

    @register_sharding(ops.rms_norm_fwd.default)
    def _rms_norm_fwd(x, weight, eps):  # noqa: ANN001, ANN202 - DTensor passes its tensor specs
        rules = [([R, R], [R, R, None])]  # (y, rstd) <- (x, weight, eps)
        rules += [([Shard(d), Shard(d)], [Shard(d), R, None]) for d in range(x.ndim - 1)]
        return rules

    @register_sharding(ops.rms_norm_bwd.default)
    def _rms_norm_bwd(dy, x, weight, rstd):  # noqa: ANN001, ANN202
        rules = [([R, R], [R, R, R, R])]  # (dx, dweight) <- (dy, x, weight, rstd)
        rules += [([Shard(d), Partial()], [Shard(d), Shard(d), R, Shard(d)]) for d in range(x.ndim - 1)]
        return rules

    def opt(t, placement):  # noqa: ANN001, ANN202 - None for an absent optional tensor argument
        return None if t is None else placement

    @register_sharding(ops.layer_norm_fwd.default)
    def _layer_norm_fwd(x, weight, bias, shift, scale, eps):  # noqa: ANN001, ANN202
        # (y, mean, rstd) <- (x, weight, bias, shift, scale, eps)
        affine = [opt(weight, R), opt(bias, R)]
        rules = [([R] * 3, [R, *affine, opt(shift, R), opt(scale, R), None])]
        for d in range(x.ndim - 1):
            mod = Shard(0) if d == 0 else R  # shift / scale follow a batch shard, else stay replicated
            rules.append(([Shard(d)] * 3, [Shard(d), *affine, opt(shift, mod), opt(scale, mod), None]))
        return rules

    @register_sharding(ops.layer_norm_bwd.default)
    def _layer_norm_bwd(dy, x, weight, bias, scale, mean, rstd):  # noqa: ANN001, ANN202
        # (dx, dweight, dbias, dshift, dscale) <- (dy, x, weight, bias, scale, mean, rstd)
        affine = [opt(weight, R), opt(bias, R)]
        rules = [([R] * 5, [R, R, *affine, opt(scale, R), R, R])]
        for d in range(x.ndim - 1):
            mod_in, mod_grad = (Shard(0), Shard(0)) if d == 0 and scale is not None else (R, Partial())
            rules.append(
                (
                    [Shard(d), Partial(), Partial(), mod_grad, mod_grad],
                    [Shard(d), Shard(d), *affine, opt(scale, mod_in), Shard(d), Shard(d)],
                )
            )
        return rules

    @register_sharding(ops.swiglu_fwd.default)
    def _swiglu_fwd(gate, up):  # noqa: ANN001, ANN202
        return [([R], [R, R])] + [([Shard(d)], [Shard(d), Shard(d)]) for d in range(gate.ndim)]

    @register_sharding(ops.swiglu_bwd.default)
    def _swiglu_bwd(dy, gate, up):  # noqa: ANN001, ANN202
        return [([R, R], [R, R, R])] + [([Shard(d)] * 2, [Shard(d)] * 3) for d in range(gate.ndim)]

    @register_sharding(ops.attention_fwd.default)
    def _attention_fwd(q, k, v, scale, causal, window):  # noqa: ANN001, ANN202
        # (out [B,H,T,D], lse [B,H,T]) <- (q, k, v, scale, causal, window)
        return [([R, R], [R, R, R, None, None, None])] + [
            ([Shard(d), Shard(d)], [Shard(d)] * 3 + [None] * 3) for d in (0, 1)
        ]

    @register_sharding(ops.attention_bwd.default)
    def _attention_bwd(do, q, k, v, out, lse, dlse, scale, causal, window):  # noqa: ANN001, ANN202
        # (dq, dk, dv) <- (do, q, k, v, out, lse, dlse, scale, causal, window)
        return [([R] * 3, [R] * 7 + [None] * 3)] + [([Shard(d)] * 3, [Shard(d)] * 7 + [None] * 3) for d in (0, 1)]

    @register_sharding(ops.rope.default)
    def _rope(q, k, cos, sin, inverse):  # noqa: ANN001, ANN202
        # (q_rot, k_rot) <- (q [B,T,H,D], k, cos, sin, inverse)
        return [([R, R], [R, R, R, R, None])] + [([Shard(d)] * 2, [Shard(d)] * 2 + [R, R, None]) for d in (0, 2)]

    return True
