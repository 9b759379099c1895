"""LayerNorm forward + backward in Triton, with an optional fused adaLN "modulate" (DiT).

Layout: x [..., N] (any leading dims, flattened to rows M x N); optional weight [N] and bias [N] (nn.LayerNorm's
elementwise affine, which may be off); optional shift and scale [B, N] with x [B, ..., N]: each of the B leading
slices (T = M / B rows, e.g. the tokens of one image) gets its own shift and scale row.

Math, per row, in fp32 (stored in x's dtype):
  mean = sum(x) / N,  rstd = 1 / sqrt(sum((x - mean)^2) / N + eps),  x_hat = (x - mean) * rstd
  z = x_hat * weight + bias                              (each term only when given)
  y = z * (1 + scale[b]) + shift[b]                      (modulate only; b = the row's leading index)
The modulate form is DiT's adaLN-Zero (scaletrain/recipes/diffusion/dit.py: modulate(norm(x), shift, scale) =
norm(x) * (1 + scale[:, None]) + shift[:, None]).

Why fused: eager LayerNorm + modulate is F.layer_norm (one kernel, a saved normalized copy of x on some
backends) followed by an add, a mul and another add over the whole [B, T, N] activation, each a full read and
write, with autograd keeping the intermediates. Here the forward is one read of x and one write of y; the only
saved extras are mean and rstd (two fp32 per row), and x_hat / z are recomputed in the backward.

Each program of the forward normalizes a [BLOCK_M, BLOCK_N] tile (BLOCK_N = N rounded up to a power of two,
BLOCK_M rows such that the tile holds <= 4096 elements: one row of a wide input, several of a narrow one).

Backward, with dz = dy * (1 + scale[b]) (dz = dy without modulate) and g = dz * weight (g = dz without one):
  dx     = rstd * (g - mean(g) - x_hat * mean(g * x_hat))        (per row)
  dweight = sum over rows of dz * x_hat,   dbias = sum over rows of dz
  dshift[b] = sum over the rows of slice b of dy,   dscale[b] = same of dy * z
The backward is persistent: programs_per_group programs per leading slice b (one group of all rows without
modulate), each walking a contiguous run of that slice's rows a [BLOCK_M, BLOCK_N] tile at a time and
accumulating dweight / dbias / dshift / dscale partial sums in fp32 registers; each program writes its partials
to its own row of a [programs, N] buffer and torch sums them. No atomics, so the result is deterministic; and a
program never straddles two slices, so the per-slice dshift / dscale need no second pass over x.
"""

import torch

from . import reference
from ._triton import kernel_op, launch, num_programs_hint, tl, triton, use_triton


@triton.jit
def _ln_fwd_kernel(
    X, W, B, SHIFT, SCALE, Y, MEAN, RSTD, M, N, rows_per_group, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: rows * N cannot overflow
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if MODULATE:
        group_offs = (rows // rows_per_group)[:, None] * N + cols[None, :]
        scale = tl.load(SCALE + group_offs, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + group_offs, mask=mask, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(
    DY, X, W, B, SCALE, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL, DSHIFT_PARTIAL, DSCALE_PARTIAL,
    N, rows_per_group, programs_per_group, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    group = pid // programs_per_group
    chunk = pid % programs_per_group
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    dshift = tl.zeros([BLOCK_N], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if MODULATE:
        scale = tl.load(SCALE + group.to(tl.int64) * N + cols, mask=col_ok, other=0.0).to(tl.float32)
        one_plus_scale = (1.0 + scale)[None, :]
    # This program's rows: a contiguous run inside its group, BLOCK_M rows at a time (int64 offsets).
    first = chunk.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(first + rows_per_program, rows_per_group) - first  # <= 0 for a surplus program
    row_start = group.to(tl.int64) * rows_per_group + first
    for i in range(0, n_rows, BLOCK_M):
        local = i + tl.arange(0, BLOCK_M)
        row_ok = local < n_rows
        rows = row_start + local
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if MODULATE:
            z = x_hat
            if HAS_WEIGHT:
                z = z * w
            if HAS_BIAS:
                z = z + b
            dshift += tl.sum(dy, 0)
            dscale += tl.sum(dy * z, 0)
            dy = dy * one_plus_scale
        if HAS_BIAS:
            db += tl.sum(dy, 0)
        if HAS_WEIGHT:
            dw += tl.sum(dy * x_hat, 0)
            g = dy * w
        else:
            g = dy
        c_mean = tl.sum(g, 1) / N
        c_proj = tl.sum(g * x_hat, 1) / N
        dx = rstd[:, None] * (g - c_mean[:, None] - x_hat * c_proj[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    out = pid.to(tl.int64) * N + cols
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + out, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + out, db, mask=col_ok)
    if MODULATE:
        tl.store(DSHIFT_PARTIAL + out, dshift, mask=col_ok)
        tl.store(DSCALE_PARTIAL + out, dscale, mask=col_ok)


TILE = 4096  # elements per [BLOCK_M, BLOCK_N] tile: one row of a wide input, several rows of a narrow one


def _block(n: int) -> int:
    return triton.next_power_of_2(n)


def _rows_per_tile(block_n: int, rows: int) -> int:
    return max(1, min(TILE // block_n, triton.next_power_of_2(max(rows, 1))))


def _warps(block: int) -> int:
    return min(16, max(1, block // 256))


def _placeholder(x: torch.Tensor) -> torch.Tensor:
    """Stands for the gradient of an absent optional input (custom ops cannot return None)."""
    return x.new_empty(0)


def _fwd_fake(x, weight, bias, shift, scale, eps):  # noqa: ANN001, ANN202
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@kernel_op("layer_norm_fwd", fake=_fwd_fake)
def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y like x, mean [...] fp32, rstd [...] fp32). shift and scale come together or not at all."""
    x = x.contiguous()
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    y = torch.empty_like(x)
    mean = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if m == 0:
        return y, mean, rstd
    modulate = shift is not None
    groups = shift.shape[0] if modulate else 1
    block = _block(n)
    block_m = _rows_per_tile(block, m)
    launch(_ln_fwd_kernel)[(triton.cdiv(m, block_m),)](
        x,
        weight.contiguous() if weight is not None else x,  # unused pointers get x (never read)
        bias.contiguous() if bias is not None else x,
        shift.contiguous() if modulate else x,
        scale.contiguous() if modulate else x,
        y, mean, rstd, m, n, m // groups, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, MODULATE=modulate, BLOCK_M=block_m,
        BLOCK_N=block, num_warps=_warps(block * block_m),
    )  # fmt: skip
    return y, mean, rstd


def _bwd_fake(dy, x, weight, bias, scale, mean, rstd):  # noqa: ANN001, ANN202
    like = lambda t: torch.empty_like(t) if t is not None else _placeholder(x)  # noqa: E731
    return torch.empty_like(x), like(weight), like(bias), like(scale), like(scale)


@kernel_op("layer_norm_bwd", fake=_bwd_fake)
def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias, dshift, dscale); an absent input's gradient is an empty placeholder.

    The shift itself is not needed (its gradient is a sum of dy), so only scale says "modulate".
    """
    dy, x = dy.contiguous(), x.contiguous()
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    modulate = scale is not None
    groups = scale.shape[0] if modulate else 1
    rows_per_group = m // groups if groups else 0
    programs_per_group = max(1, min(rows_per_group, triton.cdiv(num_programs_hint(x.device), max(groups, 1))))
    rows_per_program = triton.cdiv(max(rows_per_group, 1), programs_per_group)
    programs = groups * programs_per_group
    dx = torch.empty_like(x)

    def partial(present: bool) -> torch.Tensor:
        return torch.zeros((max(programs, 1), n), device=x.device, dtype=torch.float32) if present else dx

    dw_p, db_p = partial(weight is not None), partial(bias is not None)
    dshift_p, dscale_p = partial(modulate), partial(modulate)
    if m > 0:
        block = _block(n)
        block_m = _rows_per_tile(block, rows_per_program)
        launch(_ln_bwd_kernel)[(programs,)](
            dy, x,
            weight.contiguous() if weight is not None else x,
            bias.contiguous() if bias is not None else x,
            scale.contiguous() if modulate else x,
            mean, rstd, dx, dw_p, db_p, dshift_p, dscale_p,
            n, rows_per_group, programs_per_group, rows_per_program,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, MODULATE=modulate, BLOCK_M=block_m,
            BLOCK_N=block, num_warps=_warps(block * block_m),
        )  # fmt: skip
    dw = dw_p.sum(0).to(weight.dtype) if weight is not None else _placeholder(x)
    db = db_p.sum(0).to(bias.dtype) if bias is not None else _placeholder(x)
    if modulate:
        dshift = dshift_p[:programs].view(groups, programs_per_group, n).sum(1).to(scale.dtype)
        dscale = dscale_p[:programs].view(groups, programs_per_group, n).sum(1).to(scale.dtype)
    else:
        dshift, dscale = _placeholder(x), _placeholder(x)
    return dx, dw, db, dshift, dscale


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, shift, scale, _ = inputs
    ctx.present = (weight is not None, bias is not None, shift is not None)
    ctx.shift_dtype = shift.dtype if shift is not None else None
    ctx.save_for_backward(x, weight, bias, scale, output[1], output[2])


def _backward(ctx, dy: torch.Tensor, _dmean: torch.Tensor | None, _drstd: torch.Tensor | None):  # noqa: ANN001
    x, weight, bias, scale, mean, rstd = ctx.saved_tensors
    dx, dw, db, dshift, dscale = layer_norm_bwd(dy, x, weight, bias, scale, mean, rstd)
    has_w, has_b, has_mod = ctx.present
    if has_mod:
        dshift = dshift.to(ctx.shift_dtype)  # computed in scale's dtype
    return (dx, dw if has_w else None, db if has_b else None, dshift if has_mod else None,
            dscale if has_mod else None, None)  # fmt: skip


if hasattr(layer_norm_fwd, "register_autograd"):
    layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != x.shape[-1:]:
            raise ValueError(f"{name} shape {tuple(t.shape)} must be ({x.shape[-1]},)")


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim of x ([..., N]), optional weight / bias [N]; output in x's dtype.

    Same math as ``F.layer_norm(x, (N,), weight, bias, eps)`` (statistics in fp32).
    """
    _check_affine(x, weight, bias)
    if use_triton(x, *(t for t in (weight, bias) if t is not None)):
        return layer_norm_fwd(x, weight, bias, None, None, float(eps))[0]
    return reference.layer_norm_reference(x, weight, bias, eps)


def layer_norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """adaLN: LayerNorm(x) * (1 + scale) + shift, for x [B, ..., N] and shift / scale [B, N] broadcast over
    the middle dims (DiT's tokens); optional LayerNorm weight / bias [N]. Output in x's dtype."""
    _check_affine(x, weight, bias)
    if x.dim() < 2:
        raise ValueError(f"x must be [B, ..., N] for modulate, got shape {tuple(x.shape)}")
    want = (x.shape[0], x.shape[-1])
    for name, t in (("shift", shift), ("scale", scale)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} shape {tuple(t.shape)} must be {want} (x is {tuple(x.shape)})")
    if use_triton(x, shift, scale, *(t for t in (weight, bias) if t is not None)):
        return layer_norm_fwd(x, weight, bias, shift, scale, float(eps))[0]
    return reference.layer_norm_modulate_reference(x, shift, scale, eps, weight, bias)
