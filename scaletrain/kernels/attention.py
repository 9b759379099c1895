"""Flash attention (FlashAttention-2 style) forward + backward in Triton, with GQA, causal and sliding window.

Layout: q_BHTD [B, H, T, D]; k_BHSD / v_BHSD [B, Hkv, S, D] with Hkv dividing H (grouped-query attention:
query head h reads kv head h // (H // Hkv)). D must be a power of two in [16, 128]. T and S need not be
multiples of the block sizes. Masking conventions (bottom-right aligned causal, left-bounded window) are
documented in ``reference.attention_mask``.

Why: the [T, S] score matrix is never stored. The forward streams K/V blocks through an online softmax
(running max m and normalizer l, kept in the log2 domain so the kernel uses exp2) and saves only
out and lse = log(sum(exp(scores))) per row. The backward recomputes probabilities from lse:
  preprocess  delta = rowsum(dO * O) - dlse      (dlse lets gradients flow through the returned lse,
                                                  which ring attention needs when merging partial outputs)
  dK/dV       one program per kv block, looping over every query head of its GQA group (no atomics)
  dQ          one program per query block, looping over kv blocks
with dS = P * (dP - delta), dP = dO V^T.

Under the Triton interpreter (CPU tests) dot operands are upcast to fp32 because the interpreter's bf16
dot is not correct; on GPU bf16/fp16 operands go straight to tensor cores with fp32 accumulation, and
fp32 inputs use IEEE (not TF32) dots so they match the reference closely.

Launch configs: on CUDA the forward, dK/dV and dQ kernels are autotuned (``triton.autotune``, pruned per
call by shared memory and sequence length; see "launch configurations" below and ``last_configs()``);
the interpreter and ``SCALETRAIN_ATTENTION_AUTOTUNE=0`` use fixed configs.
"""

import functools
import math
import os

import torch

from . import reference
from ._triton import INTERPRET, TRITON_AVAILABLE, kernel_op, launch, tl, triton, use_triton

LOG2E = 1.4426950408889634


# -- block-mask helpers, shared by the forward and both backward kernels ------------------------------------
# Plain @triton.jit functions are inlined into their callers at compile time (constexpr flags stay
# constexpr), so factoring the mask logic out costs nothing at run time and keeps the three kernels'
# masking identical by construction.


@triton.jit
def _kv_block_range(start_m, q_offset, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):  # fmt: skip
    """[lo, hi) over keys holding a visible key for some query of the block starting at row start_m.

    Causal: no key past the block's last query position. Window: none at or before first query - window
    (lo rounded down to a kv block so the loop stays block-aligned).
    """
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + q_offset)
    if WINDOWED:
        lo = tl.maximum(0, start_m + q_offset - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _q_block_range(start_n, q_offset, T, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):  # fmt: skip
    """[lo, hi) over queries that see some key of the kv block starting at start_n (the dK/dV loop).

    Causal: q_pos >= first key of the block (lo rounded down to a query block). Window: q_pos < last key
    of the block + window.
    """
    lo = 0
    hi = T
    if CAUSAL:
        lo = tl.maximum(0, start_n - q_offset)
        lo = (lo // BLOCK_M) * BLOCK_M
    if WINDOWED:
        hi = tl.minimum(T, start_n + BLOCK_N - 1 + window - q_offset)
    return lo, hi


@triton.jit
def _visible(q_pos, k_idx, S, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of the (query, key) pairs that attend: key in range, causal, in the window."""
    visible = k_idx[None, :] < S
    if CAUSAL:
        visible = visible & (k_idx[None, :] <= q_pos[:, None])
    if WINDOWED:
        visible = visible & (k_idx[None, :] > q_pos[:, None] - window)
    return visible


@triton.jit(do_not_specialize=["T_BUCKET", "S_BUCKET"])  # autotune-key only (unused)
def _attn_fwd_kernel(
    Q, K, V, Out, LSE,
    qk_scale_log2, T, S, H, HKV, q_offset, window, T_BUCKET, S_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // (H // HKV)
    q_base = pid_bh.to(tl.int64) * T * HEAD_DIM
    kv_base = (b * HKV + hkv).to(tl.int64) * S * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = offs_m + q_offset  # absolute position of each query (bottom-right alignment)

    # Only visit kv blocks that can hold a visible key for some query of this block.
    lo, hi = _kv_block_range(pid_m * BLOCK_M, q_offset, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        k_idx = start_n + offs_n
        kv_mask = k_idx[:, None] < S
        k = tl.load(K + kv_base + k_idx[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_base + k_idx[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale_log2
        s = tl.where(_visible(q_pos, k_idx, S, window, CAUSAL, WINDOWED), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 instead to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(
        Out + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=offs_m[:, None] < T,
    )
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _attn_bwd_preprocess_kernel(Out, DO, DLSE, DELTA, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = pid_bh.to(tl.int64) * T * HEAD_DIM
    row_mask = offs_m[:, None] < T
    o = tl.load(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
    do = tl.load(DO + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask, other=0.0).to(tl.float32)
    dlse = tl.load(DLSE + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1) - dlse, mask=offs_m < T)


@triton.jit(do_not_specialize=["T_BUCKET", "S_BUCKET"])  # autotune-key only (unused)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    qk_scale_log2, sm_scale, T, S, H, HKV, q_offset, window, T_BUCKET, S_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # over B * HKV
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    group = H // HKV
    kv_base = pid_bh.to(tl.int64) * S * HEAD_DIM

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_mask = offs_n[:, None] < S
    k = tl.load(K + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Only visit query blocks that can see some key of this block.
    lo, hi = _q_block_range(pid_n * BLOCK_N, q_offset, T, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)

    for g in range(0, group):
        bh = (b * H + hkv * group + g).to(tl.int64)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_mask = offs_m[:, None] < T
            q = tl.load(Q + bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask, other=0.0)
            do = tl.load(
                DO + bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask, other=0.0
            )
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # fully-masked rows: all p are 0 anyway
            delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale_log2
            q_pos = offs_m + q_offset
            # Rows past T are masked too: their zero-loaded q/do would otherwise still get p = exp2(0 - 0) = 1.
            visible = (offs_m[:, None] < T) & _visible(q_pos, offs_n, S, window, CAUSAL, WINDOWED)
            p = tl.where(visible, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)

    dk = dk * sm_scale
    tl.store(DK + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["T_BUCKET", "S_BUCKET"])  # autotune-key only (unused)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    qk_scale_log2, sm_scale, T, S, H, HKV, q_offset, window, T_BUCKET, S_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // (H // HKV)
    q_base = pid_bh.to(tl.int64) * T * HEAD_DIM
    kv_base = (b * HKV + hkv).to(tl.int64) * S * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_mask = offs_m[:, None] < T
    q = tl.load(Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    q_pos = offs_m + q_offset

    lo, hi = _kv_block_range(pid_m * BLOCK_M, q_offset, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = offs_n[:, None] < S
        k = tl.load(K + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale_log2
        visible = _visible(q_pos, offs_n, S, window, CAUSAL, WINDOWED)
        p = tl.where(visible, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    dq = dq * sm_scale
    tl.store(DQ + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_mask)


# -- launch configurations ----------------------------------------------------------------------------------
# On CUDA the forward, dK/dV and dQ kernels are autotuned (triton.autotune) over the small spaces below; under
# the interpreter, or with SCALETRAIN_ATTENTION_AUTOTUNE=0, they run the fixed configs of _fixed_config.
# BLOCK_M is always the query-row tile and BLOCK_N the key/value-row tile. No kernel needs a relation between
# them: block ranges are rounded to the loop's own tile and every tile is masked element-wise.
AUTOTUNE_ENV = "SCALETRAIN_ATTENTION_AUTOTUNE"
DEFAULT_SHARED_MEM = 227 * 1024  # H100 (sm_90) opt-in shared memory per block; used when no GPU can say

# (BLOCK_M, BLOCK_N, num_warps), each crossed with every num_stages in _STAGES: 18 / 15 / 15 configs. The fixed
# 16-bit GPU configs are members, so tuning never has fewer choices than the fixed path. Around the Triton
# tutorial's Hopper choices (forward BLOCK_M 64/128 x BLOCK_N 64/128; backward: narrow query tiles under wide
# kv tiles for dK/dV, wide query tiles over narrow kv tiles for dQ), 8 warps only with a 128-row tile side.
_TILES = {
    "fwd": ((64, 64, 4), (64, 64, 8), (64, 128, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8)),
    "dkdv": ((32, 64, 8), (64, 64, 4), (32, 128, 4), (32, 128, 8), (64, 128, 8)),
    "dq": ((32, 64, 8), (64, 64, 4), (128, 32, 4), (128, 32, 8), (128, 64, 8)),
}
_STAGES = (2, 3, 4)
# What changes the best choice; triton.autotune adds every tensor argument's dtype to the key itself.
# T_BUCKET / S_BUCKET are T and S rounded up to powers of two, so a new length re-tunes only per octave.
AUTOTUNE_KEY = ["HEAD_DIM", "CAUSAL", "WINDOWED", "T_BUCKET", "S_BUCKET"]


def autotune_space(kernel: str) -> list:
    """The full (unpruned) config list of ``kernel`` ("fwd", "dkdv" or "dq") as triton.Config objects."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps in _TILES[kernel]
        for stages in _STAGES
    ]


def shared_mem_estimate(kernel: str, block_m: int, block_n: int, head_dim: int, elem_bytes: int, stages: int) -> int:
    """Upper bound (bytes) of the shared memory Triton allocates for one config on sm_90.

    The software pipeliner keeps ``stages`` buffers of each tile loaded in the loop (K and V in the forward
    and dQ kernels; Q, dO and their lse/delta rows in dK/dV); the operands held across the loop (Q; Q and dO;
    K and V) stay in shared memory for the tensor-core dots, and the backward kernels stage the [BLOCK_M,
    BLOCK_N] probabilities / dS for their dots (bounded by two tiles). The forward's bound is exact for
    16-bit inputs with Triton 3.9; the backward's is 5-100% above. tests/kernels/test_gpu_compile.py
    compiles every surviving config and checks the bound against Triton's own allocation.
    """
    d, e, m, n = head_dim, elem_bytes, block_m, block_n
    if kernel == "fwd":
        return (m * d + stages * 2 * n * d) * e
    if kernel == "dkdv":
        return stages * (2 * m * d * e + 8 * m) + 2 * n * d * e + 2 * m * n * e
    return stages * 2 * n * d * e + 2 * m * d * e + 2 * m * n * e + 8 * m


@functools.cache
def _shared_mem_budget(device_index: int | None) -> int:
    if device_index is None:
        return DEFAULT_SHARED_MEM
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - no driver (compile-only tests) or an older API: assume an H100
        return DEFAULT_SHARED_MEM


def prune_configs(
    kernel: str, configs: list, *, head_dim: int, dtype: torch.dtype, t_bucket, s_bucket, budget: int  # noqa: ANN001
) -> list:  # fmt: skip
    """The configs worth benchmarking for one call; never empty.

    1. fp32: the fixed config only, no tuning (IEEE fp32 dots run on CUDA cores, not tensor cores; fp32 is
       for checking, not speed, and each fp32 config takes seconds to compile).
    2. Shared memory: drop configs whose ``shared_mem_estimate`` exceeds ``budget`` (they could not launch).
    3. Length: drop tiles longer than the bucketed sequence (they compute padding); if none is short enough,
       keep the single smallest tile (nothing to tune on such short inputs).
    """
    if dtype == torch.float32:
        fixed = _fixed_config(kernel, head_dim, dtype)
        tile = {"BLOCK_M": fixed["BLOCK_M"], "BLOCK_N": fixed["BLOCK_N"]}
        return [triton.Config(tile, num_warps=fixed["num_warps"], num_stages=fixed["num_stages"])]

    def smem(c) -> int:  # noqa: ANN001
        return shared_mem_estimate(
            kernel, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], head_dim, dtype.itemsize, c.num_stages
        )

    kept = [c for c in configs if smem(c) <= budget]
    if isinstance(t_bucket, int) and isinstance(s_bucket, int) and kept:  # SymInts (dynamic shapes): no guess
        short = [c for c in kept if c.kwargs["BLOCK_M"] <= t_bucket and c.kwargs["BLOCK_N"] <= s_bucket]
        size = lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
        kept = short or [min(kept, key=size)]
    return kept or [min(configs, key=smem)]


def _pruner(kernel: str):  # noqa: ANN202
    def prune(configs, named_args, **kwargs):  # noqa: ANN001, ANN202 - triton.autotune's early_config_prune
        args = {**named_args, **kwargs}
        q = args["Q"]
        index = q.device.index if q.device.type == "cuda" else None
        if index is None and q.device.type == "cuda":
            index = torch.cuda.current_device()
        return prune_configs(
            kernel, configs, head_dim=args["HEAD_DIM"], dtype=q.dtype, t_bucket=args["T_BUCKET"],
            s_bucket=args["S_BUCKET"], budget=_shared_mem_budget(index),
        )  # fmt: skip

    return prune


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


@functools.cache
def autotuned_kernel(kernel: str):  # noqa: ANN201
    """``triton.autotune`` around one kernel. The kernels overwrite their outputs (plain stores, no atomics,
    no accumulation into an output), so the benchmark's repeated launches need no reset_to_zero/restore_value.
    """
    return triton.autotune(
        configs=autotune_space(kernel), key=AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _pruner(kernel)}
    )(_KERNELS[kernel])


def autotune_enabled() -> bool:
    """Autotune on CUDA unless SCALETRAIN_ATTENTION_AUTOTUNE=0; never under the interpreter (CPU tests)."""
    return TRITON_AVAILABLE and not INTERPRET and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _fixed_config(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Fixed block sizes / launch options. Interpreter: small blocks exercise the multi-block paths cheaply."""
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    wide = head_dim > 64 or dtype == torch.float32  # keep shared memory per stage bounded
    warps, stages = (8 if head_dim > 64 else 4), (2 if wide else 3)
    if kernel == "fwd":
        return dict(BLOCK_M=64 if wide else 128, BLOCK_N=64, num_warps=warps, num_stages=stages)
    return dict(BLOCK_M=32 if wide else 64, BLOCK_N=64, num_warps=warps, num_stages=stages)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _describe(config: dict) -> str:
    return (f"BLOCK_M={config['BLOCK_M']} BLOCK_N={config['BLOCK_N']} warps={config['num_warps']} "
            f"stages={config['num_stages']}")  # fmt: skip


_last: dict[str, object] = {}  # kernel -> its Autotuner (autotuned launch) or the fixed config's description


def last_configs() -> dict[str, str]:
    """The config each attention kernel ("fwd", "dkdv", "dq") last launched with in this process, e.g.
    ``{"fwd": "BLOCK_M=128 BLOCK_N=64 warps=8 stages=3 (autotuned)", ...}``; kernels not launched yet are
    absent. Under torch.compile inductor runs its own copy of the autotuner, whose choice is not seen here.
    """
    out = {}
    for kernel, source in _last.items():
        if isinstance(source, str):
            out[kernel] = source + " (fixed)"
            continue
        best = getattr(source, "best_config", None)
        if best is None:
            out[kernel] = "autotuned (choice not visible: compiled by inductor)"
        else:
            config = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
            out[kernel] = _describe(config) + " (autotuned)"
    return out


def _bucket(n):  # noqa: ANN001, ANN202
    return triton.next_power_of_2(n) if isinstance(n, int) else n


def _launch(kernel: str, grid, args: tuple, head_dim: int, dtype: torch.dtype, **constexprs) -> None:  # noqa: ANN001
    """Launch ``kernel`` with ``grid(meta)``: autotuned, or with its fixed config."""
    if autotune_enabled():
        tuned = autotuned_kernel(kernel)
        launch(tuned)[grid](*args, **constexprs)
        _last[kernel] = tuned
        return
    config = _fixed_config(kernel, head_dim, dtype)
    launch(_KERNELS[kernel])[grid](*args, **constexprs, **config)
    _last[kernel] = _describe(config)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B,H,T,D], k/v [B,Hkv,S,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1] != 0:
        raise ValueError(f"kv shape {tuple(k.shape)} incompatible with q {tuple(q.shape)} (Hkv must divide H)")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q/k/v must share dtype and device; got {q.dtype}/{k.dtype}/{v.dtype}")
    if d not in (16, 32, 64, 128):
        raise ValueError(f"head_dim must be one of 16, 32, 64, 128; got {d}")


def _fwd_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, window: int):
    b, h, t, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, t), dtype=torch.float32)


@kernel_op("attention_fwd", fake=_fwd_fake)
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B,H,T,D], lse [B,H,T] fp32). ``window`` <= 0 means no window."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((b, h, t), device=q.device, dtype=torch.float32)
    _launch(
        "fwd", lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h),
        (q, k, v, out, lse, scale * LOG2E, t, s, h, hkv, s - t, window, _bucket(t), _bucket(s)),
        d, q.dtype, HEAD_DIM=d, CAUSAL=causal, WINDOWED=window > 0, UPCAST=INTERPRET, PREC=_precision(q.dtype),
    )  # fmt: skip
    return out, lse


def _bwd_fake(do, q, k, v, out, lse, dlse, scale: float, causal: bool, window: int):  # noqa: ANN001
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@kernel_op("attention_bwd", fake=_bwd_fake)
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor, scale: float, causal: bool, window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Returns (dq, dk, dv); ``dlse`` is the incoming gradient of lse (zeros when lse was unused)."""
    do, q, k, v, out = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous()
    lse, dlse = lse.contiguous(), dlse.float().contiguous()
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    delta = torch.empty_like(lse)
    block_m = _fixed_config("dq", d, q.dtype)["BLOCK_M"]  # the preprocess is memory-bound: not tuned
    launch(_attn_bwd_preprocess_kernel)[(triton.cdiv(t, block_m), b * h)](
        out, do, dlse, delta, t, HEAD_DIM=d, BLOCK_M=block_m
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(HEAD_DIM=d, CAUSAL=causal, WINDOWED=window > 0, UPCAST=INTERPRET, PREC=_precision(q.dtype))
    tail = (scale * LOG2E, scale, t, s, h, hkv, s - t, window, _bucket(t), _bucket(s))
    _launch(
        "dkdv", lambda meta: (triton.cdiv(s, meta["BLOCK_N"]), b * hkv), (q, k, v, do, lse, delta, dk, dv, *tail),
        d, q.dtype, **common,
    )  # fmt: skip
    _launch(
        "dq", lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h), (q, k, v, do, lse, delta, dq, *tail),
        d, q.dtype, **common,
    )  # fmt: skip
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, scale, causal, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.causal, ctx.window = scale, causal, window
    # An unused output's gradient arrives as None (not as zeros autograd would build as a plain tensor,
    # which DTensor inputs could not mix with); the zeros are made below, like the saved tensors.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None):  # noqa: ANN001
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, dlse, ctx.scale, ctx.causal, ctx.window)
    return dq, dk, dv, None, None, None


if hasattr(attention_fwd, "register_autograd"):
    attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Flash attention. Returns out [B,H,T,D] (q's dtype), plus lse [B,H,T] fp32 when ``return_lse``.

    ``scale`` defaults to 1/sqrt(D). ``window`` (>= 1) restricts each query to keys with
    key_pos > query_pos - window. Rows that see no key (possible when causal and T > S) give out=0, lse=-inf.
    Falls back to ``reference.attention_reference`` when Triton cannot run on these tensors.
    """
    _check(q_BHTD, k_BHSD, v_BHSD)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    scale = 1.0 / math.sqrt(q_BHTD.shape[-1]) if scale is None else float(scale)
    if use_triton(q_BHTD, k_BHSD, v_BHSD):
        out, lse = attention_fwd(q_BHTD, k_BHSD, v_BHSD, scale, causal, window or 0)
    else:
        out, lse = reference.attention_reference(q_BHTD, k_BHSD, v_BHSD, causal=causal, scale=scale, window=window)
    return (out, lse) if return_lse else out
