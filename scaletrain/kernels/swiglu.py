"""SwiGLU activation forward + backward in Triton: y = silu(gate) * up, elementwise.

Layout: gate and up of identical shape (typically [N, F], the two halves of the MLP up-projection).
Math in fp32, outputs in gate's dtype.

Why fused: eager computes silu(gate) into a temporary, multiplies, and autograd saves that temporary;
here the forward is one read of gate/up and one write of y, and the backward recomputes sigmoid:
  s = sigmoid(g);  dgate = dy * up * s * (1 + g * (1 - s));  dup = dy * g * s
"""

import torch

from . import reference
from ._triton import kernel_op, launch, tl, triton, use_triton

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


@kernel_op("swiglu_fwd", fake=lambda g, u: torch.empty_like(g))
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    numel = gate.numel()
    launch(_swiglu_fwd_kernel)[(triton.cdiv(numel, BLOCK),)](gate, up, y, numel, BLOCK=BLOCK, num_warps=4)
    return y


@kernel_op("swiglu_bwd", fake=lambda dy, g, u: (torch.empty_like(g), torch.empty_like(u)))
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    numel = gate.numel()
    launch(_swiglu_bwd_kernel)[(triton.cdiv(numel, BLOCK),)](dy, gate, up, dg, du, numel, BLOCK=BLOCK, num_warps=4)
    return dg, du


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy: torch.Tensor):  # noqa: ANN001
    gate, up = ctx.saved_tensors
    return swiglu_bwd(dy, gate, up)


if hasattr(swiglu_fwd, "register_autograd"):
    swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shaped tensors; output in gate's dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if use_triton(gate, up):
        return swiglu_fwd(gate, up)
    return reference.swiglu_reference(gate, up)
