"""GroupNorm forward + backward in Triton, with an optional fused SiLU after the affine (diffusion U-Nets / VAEs).

Layout: x [B, C, *spatial] (NCHW-contiguous, any number of spatial dims, none included: [B, C]; a non-contiguous
x, e.g. channels_last, is copied first), G groups dividing C, optional weight and bias [C] (nn.GroupNorm's affine).
With S = prod(spatial) and Cg = C / G, group (b, g) is the contiguous run x[b, g*Cg:(g+1)*Cg] of L = Cg * S
elements, seen by the kernels as a [Cg, S] matrix (a channel per row).

Math, per group, statistics in fp32 (y stored in x's dtype):
  mean = sum(x) / L,  rstd = 1 / sqrt(sum((x - mean)^2) / L + eps),  x_hat = (x - mean) * rstd
  z = x_hat * weight[c] + bias[c]                        (each term only when given; c = the element's channel)
  y = z                  or, with silu:  y = silu(z) = z * sigmoid(z)
Same as F.group_norm (biased variance) and F.silu after it.

Why fused: a diffusion residual block runs norm -> SiLU -> conv twice, and eager that is F.group_norm (a
statistics pass and a normalize pass over x) then F.silu (another read and write), with autograd keeping both
the normalized copy and SiLU's input. Here the forward is one kernel that reads x twice (statistics, then
normalize; the second read mostly from cache) and writes y once, with the SiLU applied in registers; the only
saved extras are mean and rstd (two fp32 per group). z and the SiLU are recomputed in the backward from x and the
statistics, so the pre-activation is never stored.

Parallel layout. Programs work on [BLOCK_R, BLOCK_C, BLOCK_S] tiles: BLOCK_R groups x BLOCK_C of their channels
x BLOCK_S contiguous spatial positions (BLOCK_S <= 1024; a tile holds <= 4096 elements on a GPU). A group of any
size is covered by a loop over its tiles, never assumed to fit one block (512 channels / 32 groups x 64x64 =
65536 elements: 16 tiles). Groups that fit one tile are packed BLOCK_R to a program, as long as enough programs
remain; a larger group gets a program of its own, and when there are fewer groups than SMs (one image, few
groups) each group is split along the spatial axis into `splits` runs of whole tiles, one program each. Under the
Triton interpreter (CPU tests) tiles hold up to 65536 elements and one program is the target, since there every
tile operation and every program costs Python calls (tests shrink the tiles to take every branch).

Forward, whole groups per program (one kernel): each program merges its groups' tiles' (mean, M2) with Chan's
parallel Welford update (no E[x^2] - E[x]^2 cancellation), stores mean / rstd, then walks the tiles again and
writes y. Split groups (two kernels): each program writes the (mean, M2) of its run; then each program merges its
group's `splits` partials in a fixed order (every program of the group gets the same bits; the first stores
mean / rstd) and writes y for its run.
Backward, with dz = dy (dz = dy * sigmoid(z) * (1 + z * (1 - sigmoid(z))) with silu) and g = dz * weight[c]:
  dx      = rstd * (g - mean(g) - x_hat * mean(g * x_hat))          (means over the group)
  dweight[c] = sum over batch and spatial of dz * x_hat,   dbias[c] = same of dz
Each program first writes, per channel of its run, the fp32 sums of dz and dz * x_hat to its own slot of a
[B, C, splits] buffer, which torch sums to dweight / dbias. Whole groups (one kernel): the program also weighs
those sums by weight[c] into mean(g) = sum_c weight[c] * sum(dz)[c] / L and mean(g * x_hat), then recomputes
x_hat, z, dz tile by tile and writes dx. Split groups (two kernels): torch combines the group means from the
partials (fp32, fixed order), then a second kernel writes dx.
No atomics anywhere, so forward and backward are deterministic (bit for bit from run to run).
"""

import math

import torch

from . import reference
from ._triton import INTERPRET, kernel_op, launch, num_programs_hint, tl, triton, use_triton


@triton.jit
def _tile(rows, r_ok, c0, s0, s_end, S, CPG, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets and mask of the [BLOCK_R, BLOCK_C, BLOCK_S] tile at channel c0, position s0 of groups `rows`."""
    ch = c0 + tl.arange(0, BLOCK_C)
    sp = s0 + tl.arange(0, BLOCK_S)
    mask = (r_ok[:, None] & (ch < CPG)[None, :])[:, :, None] & (sp < s_end)[None, None, :]
    offs = (rows * CPG * S)[:, None, None] + (ch.to(tl.int64) * S)[None, :, None] + sp[None, None, :]
    return offs, mask


@triton.jit
def _affine(P, rows, r_ok, c0, CPG, G, BLOCK_C: tl.constexpr):
    """weight or bias of channels c0 .. c0 + BLOCK_C of groups `rows`, as [BLOCK_R, BLOCK_C, 1] fp32."""
    ch = c0 + tl.arange(0, BLOCK_C)
    chan = ((rows % G) * CPG)[:, None] + ch[None, :]
    return tl.load(P + chan, mask=r_ok[:, None] & (ch < CPG)[None, :], other=0.0).to(tl.float32)[:, :, None]


@triton.jit
def _affine_pair(W, B, rows, r_ok, c0, CPG, G, LOAD_W: tl.constexpr, LOAD_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """(weight, bias) tiles as _affine gives them; 1.0 / 0.0 for one not loaded (absent, or not needed)."""
    w = 1.0
    b = 0.0
    if LOAD_W:
        w = _affine(W, rows, r_ok, c0, CPG, G, BLOCK_C)
    if LOAD_B:
        b = _affine(B, rows, r_ok, c0, CPG, G, BLOCK_C)
    return w, b


@triton.jit
def _welford(X, rows, r_ok, s_start, s_end, S, CPG, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_S: tl.constexpr):  # fmt: skip
    """(mean, M2) [BLOCK_R] of positions s_start .. s_end of every channel of groups `rows`: each tile's mean and M2,
    merged with Chan et al.'s parallel update (no E[x^2] - E[x]^2 cancellation)."""
    mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    count = tl.full([], 0.0, tl.float32)  # elements merged so far, the same for every row
    for c0 in range(0, CPG, BLOCK_C):
        for s0 in range(s_start, s_end, BLOCK_S):
            offs, mask = _tile(rows, r_ok, c0, s0, s_end, S, CPG, BLOCK_C, BLOCK_S)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            n = (tl.minimum(CPG - c0, BLOCK_C) * tl.minimum(s_end - s0, BLOCK_S)).to(tl.float32)
            tile_mean = tl.sum(tl.sum(x, 2), 1) / n
            d = tl.where(mask, x - tile_mean[:, None, None], 0.0)
            tile_m2 = tl.sum(tl.sum(d * d, 2), 1)
            total = count + n
            delta = tile_mean - mean
            mean = mean + delta * (n / total)
            m2 = m2 + tile_m2 + delta * delta * (count * (n / total))
            count = total
    return mean, m2


@triton.jit
def _gn_stats_kernel(
    X, MEAN_P, M2_P, ROWS, S, CPG, spatial_per_program, splits,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Split groups only: the (mean, M2) of this program's run of positions, to [ROWS, splits] buffers."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # groups (b, g); int64 offsets
    split = tl.program_id(1)
    r_ok = rows < ROWS
    s_start = split * spatial_per_program
    s_end = tl.minimum(s_start + spatial_per_program, S)
    mean, m2 = _welford(X, rows, r_ok, s_start, s_end, S, CPG, BLOCK_R, BLOCK_C, BLOCK_S)
    tl.store(MEAN_P + rows * splits + split, mean, mask=r_ok)
    tl.store(M2_P + rows * splits + split, m2, mask=r_ok)


@triton.jit
def _gn_fwd_kernel(
    X, W, B, Y, MEAN_P, M2_P, MEAN, RSTD, ROWS, S, CPG, G, spatial_per_program, splits, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    r_ok = rows < ROWS
    total = (CPG * S).to(tl.float32)
    if SPLITS == 1:  # whole groups per program: the statistics here, then a second (cached) read to normalize
        mean, m2 = _welford(X, rows, r_ok, 0, S, S, CPG, BLOCK_R, BLOCK_C, BLOCK_S)
    else:  # the splits' partials, combined in a fixed order: the same bits in every program of a group
        i = tl.arange(0, SPLITS)
        i_ok = i < splits
        p_offs = rows[:, None] * splits + i[None, :]
        p_mask = r_ok[:, None] & i_ok[None, :]
        p_mean = tl.load(MEAN_P + p_offs, mask=p_mask, other=0.0)
        p_m2 = tl.load(M2_P + p_offs, mask=p_mask, other=0.0)
        p_len = tl.minimum((i + 1) * spatial_per_program, S) - i * spatial_per_program
        p_n = tl.where(i_ok, p_len * CPG, 0).to(tl.float32)[None, :]
        mean = tl.sum(p_n * p_mean, 1) / total
        dev = p_mean - mean[:, None]
        m2 = tl.sum(p_m2 + p_n * dev * dev, 1)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)
    first = rows < tl.where(split == 0, ROWS, 0)  # the first split's programs store the statistics
    tl.store(MEAN + rows, mean, mask=first)
    tl.store(RSTD + rows, rstd, mask=first)

    s_start = split * spatial_per_program
    s_end = tl.minimum(s_start + spatial_per_program, S)
    for c0 in range(0, CPG, BLOCK_C):
        if HAS_WEIGHT:
            w = _affine(W, rows, r_ok, c0, CPG, G, BLOCK_C)
        if HAS_BIAS:
            b = _affine(B, rows, r_ok, c0, CPG, G, BLOCK_C)
        for s0 in range(s_start, s_end, BLOCK_S):
            offs, mask = _tile(rows, r_ok, c0, s0, s_end, S, CPG, BLOCK_C, BLOCK_S)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None, None]) * rstd[:, None, None]
            if HAS_WEIGHT:
                y = y * w
            if HAS_BIAS:
                y = y + b
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dz(dy, x_hat, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """The gradient at z = x_hat * w + b: dy, or through the SiLU (z recomputed) dy * s * (1 + z * (1 - s))."""
    if SILU:
        z = x_hat
        if HAS_WEIGHT:
            z = z * w
        if HAS_BIAS:
            z = z + b
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return dy


@triton.jit
def _gn_bwd_kernel(
    DY, X, W, B, MEAN, RSTD, DZ_P, DZX_P, DX, ROWS, S, CPG, G, spatial_per_program, splits,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    """Per channel of this program's run: the fp32 sums of dz and dz * x_hat, to [B * C, splits] buffers. With
    ONE_PASS (whole groups per program) also the group means of g = dz * w and g * x_hat from them, then dx."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    r_ok = rows < ROWS
    mean = tl.load(MEAN + rows, mask=r_ok, other=0.0)[:, None, None]
    rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)[:, None, None]
    s_start = split * spatial_per_program
    s_end = tl.minimum(s_start + spatial_per_program, S)
    g_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    gx_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        w, b = _affine_pair(W, B, rows, r_ok, c0, CPG, G, HAS_WEIGHT, SILU and HAS_BIAS, BLOCK_C)
        dz_sum = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        dzx_sum = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            offs, mask = _tile(rows, r_ok, c0, s0, s_end, S, CPG, BLOCK_C, BLOCK_S)
            x_hat = tl.where(mask, (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            dz = _dz(dy, x_hat, w, b, HAS_WEIGHT, HAS_BIAS, SILU)  # masked lanes: dy = 0, so dz = 0
            dz_sum += tl.sum(dz, 2)
            dzx_sum += tl.sum(dz * x_hat, 2)
        ch = c0 + tl.arange(0, BLOCK_C)
        rc_ok = r_ok[:, None] & (ch < CPG)[None, :]
        out = (rows[:, None] * CPG + ch[None, :]) * splits + split  # row * CPG + ch = b * C + c
        tl.store(DZ_P + out, dz_sum, mask=rc_ok)
        tl.store(DZX_P + out, dzx_sum, mask=rc_ok)
        if ONE_PASS:
            if HAS_WEIGHT:
                g_sum += tl.sum(dz_sum * tl.sum(w, 2), 1)
                gx_sum += tl.sum(dzx_sum * tl.sum(w, 2), 1)
            else:
                g_sum += tl.sum(dz_sum, 1)
                gx_sum += tl.sum(dzx_sum, 1)
    if ONE_PASS:
        n = (CPG * S).to(tl.float32)
        _dx_run(DY, X, W, B, DX, rows, r_ok, mean, rstd, (g_sum / n)[:, None, None], (gx_sum / n)[:, None, None],
                s_start, s_end, S, CPG, G, HAS_WEIGHT, HAS_BIAS, SILU, BLOCK_C, BLOCK_S)  # fmt: skip


@triton.jit
def _dx_run(
    DY, X, W, B, DX, rows, r_ok, mean, rstd, mean_g, mean_gx, s_start, s_end, S, CPG, G,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    """dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) over positions s_start .. s_end of groups `rows`."""
    for c0 in range(0, CPG, BLOCK_C):
        w, b = _affine_pair(W, B, rows, r_ok, c0, CPG, G, HAS_WEIGHT, SILU and HAS_BIAS, BLOCK_C)
        for s0 in range(s_start, s_end, BLOCK_S):
            offs, mask = _tile(rows, r_ok, c0, s0, s_end, S, CPG, BLOCK_C, BLOCK_S)
            x_hat = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            g = _dz(tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32), x_hat, w, b, HAS_WEIGHT, HAS_BIAS, SILU)
            if HAS_WEIGHT:
                g = g * w
            dx = rstd * (g - mean_g - x_hat * mean_gx)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_dx_kernel(
    DY, X, W, B, MEAN, RSTD, MEAN_G, MEAN_GX, DX, ROWS, S, CPG, G, spatial_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Split groups only: dx of this program's run, from the group means torch combined from the partials."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    r_ok = rows < ROWS
    mean = tl.load(MEAN + rows, mask=r_ok, other=0.0)[:, None, None]
    rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)[:, None, None]
    mean_g = tl.load(MEAN_G + rows, mask=r_ok, other=0.0)[:, None, None]
    mean_gx = tl.load(MEAN_GX + rows, mask=r_ok, other=0.0)[:, None, None]
    s_start = split * spatial_per_program
    s_end = tl.minimum(s_start + spatial_per_program, S)
    _dx_run(DY, X, W, B, DX, rows, r_ok, mean, rstd, mean_g, mean_gx, s_start, s_end, S, CPG, G, HAS_WEIGHT,
            HAS_BIAS, SILU, BLOCK_C, BLOCK_S)  # fmt: skip


TILE = 4096  # elements per [BLOCK_R, BLOCK_C, BLOCK_S] tile on a GPU
INTERPRET_TILE = 1 << 16  # under the interpreter: larger tiles, fewer (slow, Python-level) ops per element
MAX_BLOCK_S = 1024  # contiguous spatial positions per tile row


def _layout(x: torch.Tensor, num_groups: int) -> tuple[int, int, int, int]:
    """(B, C, S, Cg) of x [B, C, *spatial]."""
    b, c = x.shape[0], x.shape[1]
    return b, c, math.prod(x.shape[2:]), c // num_groups


def _target_programs(device: torch.device) -> int:
    """Programs a launch should have: a few per SM on a GPU; one under the interpreter, which runs the programs
    one after another and pays a fixed Python cost for each."""
    return 1 if INTERPRET else num_programs_hint(device)


def _plan(rows: int, cpg: int, s: int, device: torch.device) -> dict[str, int]:
    """Tile sizes and the program layout (grid = row blocks x splits).

    A tile is [BLOCK_R groups, BLOCK_C channels, BLOCK_S positions]. Groups that fit one tile are packed BLOCK_R
    to a program while that still leaves the target number of programs. A larger group gets a program of its own,
    and only when there are fewer groups than a quarter of the target (fewer than the SMs, on a GPU) is it also
    split along the spatial axis into `splits` runs of whole BLOCK_S-wide tiles, one program each: a split
    group takes two launches per pass (partial sums, then the rest), a whole one a single launch.
    """
    tile = INTERPRET_TILE if INTERPRET else TILE
    target = _target_programs(device)
    block_s = min(triton.next_power_of_2(max(s, 1)), MAX_BLOCK_S)
    block_c = min(triton.next_power_of_2(cpg), max(1, tile // block_s))
    block_r, splits = 1, 1
    if block_c >= cpg and block_s >= s:  # a whole group per tile: pack groups, keeping >= target programs
        fit = max(1, tile // (block_c * block_s))
        spare = max(1, rows // target)
        block_r = min(fit, 1 << (spare.bit_length() - 1))  # powers of two, at most `spare` groups per program
    else:
        splits = max(1, min(triton.cdiv(target, 4 * max(rows, 1)), triton.cdiv(s, block_s)))
    spatial_per_program = triton.cdiv(triton.cdiv(s, splits), block_s) * block_s
    splits = triton.cdiv(s, spatial_per_program)
    warps = min(16, max(1, block_r * block_c * block_s // 256))
    return dict(block_r=block_r, block_c=block_c, block_s=block_s, splits=splits,
                spatial_per_program=spatial_per_program, warps=warps)  # fmt: skip


def _placeholder(x: torch.Tensor) -> torch.Tensor:
    """Stands for the gradient of an absent optional input (custom ops cannot return None)."""
    return x.new_empty(0)


def _fwd_fake(x, weight, bias, num_groups, eps, silu):  # noqa: ANN001, ANN202
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@kernel_op("group_norm_fwd", fake=_fwd_fake)
def group_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y like x, mean [B, G] fp32, rstd [B, G] fp32); y = silu(group_norm(x)) when silu."""
    x = x.contiguous()
    b, _, s, cpg = _layout(x, num_groups)
    rows = b * num_groups
    y = torch.empty_like(x)
    mean = torch.empty((b, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty((b, num_groups), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        return y, mean, rstd
    p = _plan(rows, cpg, s, x.device)
    splits = p["splits"]
    grid = (triton.cdiv(rows, p["block_r"]), splits)
    tiles = dict(BLOCK_R=p["block_r"], BLOCK_C=p["block_c"], BLOCK_S=p["block_s"], num_warps=p["warps"])
    mean_p = m2_p = x  # whole groups per program: no partial statistics (the pointers are never read)
    if splits > 1:
        mean_p = torch.empty((rows, splits), device=x.device, dtype=torch.float32)
        m2_p = torch.empty_like(mean_p)
        launch(_gn_stats_kernel)[grid](x, mean_p, m2_p, rows, s, cpg, p["spatial_per_program"], splits, **tiles)
    launch(_gn_fwd_kernel)[grid](
        x,
        weight.contiguous() if weight is not None else x,  # unused pointers get x (never read)
        bias.contiguous() if bias is not None else x,
        y, mean_p, m2_p, mean, rstd, rows, s, cpg, num_groups, p["spatial_per_program"], splits, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, SPLITS=triton.next_power_of_2(splits),
        **tiles,
    )  # fmt: skip
    return y, mean, rstd


def _bwd_fake(dy, x, weight, bias, mean, rstd, num_groups, silu):  # noqa: ANN001, ANN202
    like = lambda t: torch.empty_like(t) if t is not None else _placeholder(x)  # noqa: E731
    return torch.empty_like(x, memory_format=torch.contiguous_format), like(weight), like(bias)


@kernel_op("group_norm_bwd", fake=_bwd_fake)
def group_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias); an absent weight's / bias's gradient is an empty placeholder."""
    dy, x = dy.contiguous(), x.contiguous()
    b, c, s, cpg = _layout(x, num_groups)
    rows = b * num_groups
    dx = torch.empty_like(x)
    if x.numel() == 0:
        dw = torch.zeros_like(weight) if weight is not None else _placeholder(x)
        return dx, dw, torch.zeros_like(bias) if bias is not None else _placeholder(x)
    p = _plan(rows, cpg, s, x.device)
    splits = p["splits"]
    w_arg = weight.contiguous() if weight is not None else x
    b_arg = bias.contiguous() if bias is not None else x
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, SILU=silu, BLOCK_R=p["block_r"],
                 BLOCK_C=p["block_c"], BLOCK_S=p["block_s"], num_warps=p["warps"])  # fmt: skip
    dz_p = torch.empty((b, c, splits), device=x.device, dtype=torch.float32)  # per (b, c, split): sum of dz
    dzx_p = torch.empty_like(dz_p)  # ... and of dz * x_hat
    grid = (triton.cdiv(rows, p["block_r"]), splits)
    sizes = (rows, s, cpg, num_groups, p["spatial_per_program"])
    launch(_gn_bwd_kernel)[grid](
        dy, x, w_arg, b_arg, mean, rstd, dz_p, dzx_p, dx, *sizes, splits, ONE_PASS=splits == 1, **flags
    )
    if splits > 1:  # the group means of g = dz * w and g * x_hat from the partials (fp32, fixed order), then dx
        dz_bc, dzx_bc = dz_p.sum(2), dzx_p.sum(2)
        if weight is not None:
            dz_bc, dzx_bc = dz_bc * weight.float(), dzx_bc * weight.float()
        mean_g = dz_bc.view(rows, cpg).sum(1) / (cpg * s)
        mean_gx = dzx_bc.view(rows, cpg).sum(1) / (cpg * s)
        launch(_gn_bwd_dx_kernel)[grid](dy, x, w_arg, b_arg, mean, rstd, mean_g, mean_gx, dx, *sizes, **flags)
    dw = dzx_p.sum((0, 2)).to(weight.dtype) if weight is not None else _placeholder(x)
    db = dz_p.sum((0, 2)).to(bias.dtype) if bias is not None else _placeholder(x)
    return dx, dw, db


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, num_groups, _, silu = inputs
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.present = (weight is not None, bias is not None)
    ctx.save_for_backward(x, weight, bias, output[1], output[2])


def _backward(ctx, dy: torch.Tensor, _dmean: torch.Tensor | None, _drstd: torch.Tensor | None):  # noqa: ANN001
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = group_norm_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
    has_w, has_b = ctx.present
    return dx, dw if has_w else None, db if has_b else None, None, None, None


if hasattr(group_norm_fwd, "register_autograd"):
    group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    c = x.shape[1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups {num_groups} must divide the {c} channels of x {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} shape {tuple(t.shape)} must be ({c},)")


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    silu: bool = False,
) -> torch.Tensor:
    """GroupNorm of x [B, C, *spatial] over num_groups groups of channels, optional weight / bias [C], then SiLU
    when ``silu``; output in x's dtype (contiguous). Same math as ``F.group_norm(x, num_groups, weight, bias, eps)``
    (+ ``F.silu``) with statistics in fp32."""
    _check(x, num_groups, weight, bias)
    if use_triton(x, *(t for t in (weight, bias) if t is not None)):
        return group_norm_fwd(x, weight, bias, int(num_groups), float(eps), bool(silu))[0]
    return reference.group_norm_reference(x, num_groups, weight, bias, eps, silu=silu)
