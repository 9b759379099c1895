"""RMSNorm forward + backward in Triton.

Layout: x [..., N] (any leading dims, flattened to rows M x N), weight [N]. y = x * rstd * weight with
rstd = 1 / sqrt(mean(x^2) + eps), computed in fp32 and stored in x's dtype.

Why fused: eager RMSNorm makes several passes over x (pow, mean, rsqrt, two muls) and autograd keeps the
intermediates; here the forward is one read of x and the only saved extra is rstd (one fp32 per row).
Backward, with g = dy * weight and x_hat = x * rstd:
  dx = rstd * (g - x_hat * mean(g * x_hat))          (one program per row block)
  dweight = sum over rows of dy * x_hat              (each persistent program accumulates a partial sum
                                                      over its rows in fp32; the partials are summed in torch,
                                                      which avoids atomics and is deterministic)
"""

import torch

from . import reference
from ._triton import kernel_op, launch, num_programs_hint, tl, triton, use_triton


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    tl.store(Y + row * N + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, M, N, rows_per_program, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 so r * N cannot overflow on huge inputs
    n_rows = tl.minimum(row_start + rows_per_program, M) - row_start
    for i in range(0, n_rows):
        r = row_start + i
        x = tl.load(X + r * N + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * N + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / N))
        tl.store(DX + r * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=mask)


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


def _warps(block: int) -> int:
    return min(16, max(1, block // 256))


@kernel_op("rms_norm_fwd", fake=lambda x, w, eps: (torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)))
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y like x, rstd [...] fp32)."""
    x = x.contiguous()
    n = x.shape[-1]
    m = x.numel() // n
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    block = _block(n)
    launch(_rms_fwd_kernel)[(m,)](x, weight.contiguous(), y, rstd, n, eps, BLOCK_N=block, num_warps=_warps(block))
    return y, rstd


@kernel_op("rms_norm_bwd", fake=lambda dy, x, w, rstd: (torch.empty_like(x), torch.empty_like(w)))
def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx like x, dweight like weight)."""
    dy, x = dy.contiguous(), x.contiguous()
    n = x.shape[-1]
    m = x.numel() // n
    programs = max(1, min(m, num_programs_hint(x.device)))
    rows_per_program = triton.cdiv(m, programs)
    dx = torch.empty_like(x)
    dw_partial = torch.empty((programs, n), device=x.device, dtype=torch.float32)
    block = _block(n)
    launch(_rms_bwd_kernel)[(programs,)](
        dy, x, weight.contiguous(), rstd, dx, dw_partial, m, n, rows_per_program, BLOCK_N=block,
        num_warps=_warps(block),
    )  # fmt: skip
    return dx, dw_partial.sum(0).to(weight.dtype)


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy: torch.Tensor, _drstd: torch.Tensor | None):  # noqa: ANN001
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


if hasattr(rms_norm_fwd, "register_autograd"):
    rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., N]) with weight [N]; output in x's dtype."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight shape {tuple(weight.shape)} must be ({x.shape[-1]},)")
    if use_triton(x, weight):
        return rms_norm_fwd(x, weight, float(eps))[0]
    return reference.rms_norm_reference(x, weight, eps)
