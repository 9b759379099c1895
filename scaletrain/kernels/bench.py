"""Benchmark the fused kernels against the PyTorch alternatives, all measured in the same run.

    scaletrain bench kernels --seq 1024,2048,4096,8192 --heads 16 --head-dim 128 --dtype bf16 --out runs/kbench
    python -m scaletrain.kernels.bench ...                      # the same, without the scaletrain CLI
    python -m scaletrain.kernels.bench --from-csv runs/kbench/kernels.csv --out runs/kbench   # redo table + plot

``run(...)`` returns one dict per (kernel, implementation, pass, shape) with: kernel, impl, pass, shape, dtype,
device, backend, ms, tflops, gbps, peak_mem_mb, max_err, error and, on the Triton row, ``vs_<impl>`` = that
implementation's ms / Triton's ms (> 1: Triton is faster) and, for the fused cross-entropy,
``mem_vs_eager`` = eager peak memory / Triton peak memory. ``--out DIR`` writes DIR/kernels.csv (every row),
DIR/kernels.md (a Markdown summary with the issue's goals checked) and DIR/kernels.png (ms vs sequence
length per implementation; needs matplotlib, else it says so and ``--from-csv`` can draw it elsewhere).

Shapes per sequence length T (hidden = heads * head_dim; batch B = --batch, or 16384 // T so every length
runs the same number of tokens, as the FlashAttention benchmarks do):
  attention        q [B, heads, T, head_dim], k/v [B, kv_heads, T, head_dim], causal. Alternatives: eager
                   (matmul + fp32 softmax + matmul, in the input dtype), SDPA pinned to each backend
                   (flash, efficient, cudnn; one that cannot run these inputs gets an error row) and
                   flex_attention under torch.compile with a causal BlockMask. TFLOP/s counts the causal half.
  rms_norm         x [B*T, hidden]; alternatives: eager (fp32 math, as Llama's reference code), F.rms_norm
  layer_norm       x [B*T, hidden] with weight and bias; alternatives: eager (fp32 math in plain ops, as a
                   model without a norm kernel runs it), F.layer_norm (nn.LayerNorm's, what scaletrain runs unfused)
  layer_norm_modulate  x [B, T, hidden], shift / scale [B, hidden] (DiT's adaLN, no affine); alternatives: eager
                   (fp32 plain ops), torch_layer_norm = F.layer_norm then x * (1 + scale) + shift (DiT unfused)
  group_norm       x [B, hidden/4, H, W] (a U-Net feature map, H * W = T: 64x64 at T 4096), gcd(hidden/4, 32)
                   groups, weight and bias; alternatives: eager (fp32 plain ops), torch_group_norm = F.group_norm
  group_norm_silu  the same followed by SiLU (the U-Net / VAE residual blocks' norm -> SiLU); alternatives: eager
                   (fp32 plain ops), torch_group_norm = F.group_norm then F.silu (what they run unfused)
  rope             q/k [B, T, heads, head_dim]; alternative: eager rotate-half
  swiglu           gate/up [B*T, 4 * hidden]; alternative: eager silu(gate) * up
  fused_linear_ce  hidden [T, ce_hidden] bf16, weight [vocab, ce_hidden] (default vocab 128256, Llama 3's
                   "128k", and ce_hidden 4096); alternative: eager = full logits + F.cross_entropy in fp32,
                   what scaletrain runs unfused. Reported for fwd+bwd (the only pass training runs).
GB/s for the memory-bound kernels counts the minimum traffic (each input read once, each output written
once), the same bytes for every implementation, so the GB/s ratio is the speed ratio.

Timing (CUDA): ``triton.testing.do_bench`` (median; the L2 cache is flushed before each repetition, input
gradients reset to None outside the timed region), or CUDA events when Triton is missing. Peak memory: one
more call after timing, ``torch.cuda.max_memory_allocated`` minus what was allocated before it (inputs
excluded; their gradients included). Every implementation's failure (unsupported backend, out of memory) is
caught and recorded in ``error``, so one bad alternative never loses the rest of the run.

On CPU nothing is timed: Triton runs only through its interpreter (set TRITON_INTERPRET=1 before importing
kernels), so the rows carry max_err against the plain-torch reference (fwd+bwd) and ms=None. ``backend``
says whether the Triton path really ran ("triton", "triton-interpret") or the torch fallback did.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import reference
from ._triton import INTERPRET, TRITON_AVAILABLE, use_triton
from .attention import attention, last_configs
from .fused_linear_ce import fused_linear_cross_entropy
from .group_norm import group_norm
from .layer_norm import layer_norm, layer_norm_modulate
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

KERNELS = ("attention", "rms_norm", "layer_norm", "layer_norm_modulate", "group_norm", "group_norm_silu", "rope",
           "swiglu", "fused_linear_ce")  # fmt: skip
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip
SDPA_BACKENDS = (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                 ("sdpa_cudnn", "CUDNN_ATTENTION"))  # fmt: skip
TOKENS_PER_BATCH = 16384  # auto batch = this // T
GOALS = {  # the targets, checked in the Markdown summary
    "attention": "fwd+bwd >= 1.0x the fastest SDPA backend at seq >= 2048",
    "elementwise": "rms_norm / rope / swiglu >= 1.5x eager",
    "fused_linear_ce": "peak memory >= 4x lower than eager, speed >= 0.9x eager",
    "layer_norm": "layer_norm / layer_norm_modulate >= 1.5x eager",
    "group_norm": "group_norm / group_norm_silu >= 1.5x eager",
}


# -- measuring ---------------------------------------------------------------------------------------------


def _time_ms(fn: Callable[[], Any], device: torch.device, grads_to_none: list[torch.Tensor] | None = None) -> float:
    """Median ms per call on CUDA."""
    if TRITON_AVAILABLE and not INTERPRET:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads_to_none, return_mode="median"))
    for _ in range(3):  # no Triton: CUDA events, without the L2 flush
        fn()
    times = []
    for _ in range(20):
        for x in grads_to_none or []:
            x.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _peak_mb(fn: Callable[[], Any], device: torch.device, grads_to_none: list[torch.Tensor]) -> float:
    """Peak extra CUDA memory (MiB) of one call, over what was allocated before it."""
    for x in grads_to_none:
        x.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _step(fn: Callable[..., Any], inputs: list[torch.Tensor], backward: bool) -> Callable[[], None]:
    """One call of fn on inputs, and its backward with a fixed upstream gradient of ones (made once)."""
    upstream: list[torch.Tensor] = []

    def step() -> None:
        out = fn(*inputs)
        if not backward:
            return
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        if not upstream:
            upstream.extend(torch.ones_like(o) for o in outs)
        torch.autograd.backward(outs, upstream)

    return step


def _max_err(fn: Callable[..., Any], ref: Callable[..., Any], inputs: list[torch.Tensor]) -> float:
    """Max abs difference over outputs and input grads between fn and ref on the same inputs."""
    results = []
    for f in (fn, ref):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = f(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
        results.append([o.detach().float() for o in outs] + [x.grad.float() for x in xs if x.grad is not None])
    return max((a - b).abs().max().item() for a, b in zip(*results, strict=True))


# -- cases -------------------------------------------------------------------------------------------------


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention in the input dtype (softmax in fp32): what a model without SDPA runs."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    t = q.shape[2]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def _sdpa_with(backend: Any, gqa: bool) -> Callable:
    """SDPA pinned to one backend. With grouped-query heads it first tries enable_gqa; a backend without GQA
    support gets the kv heads expanded instead (what a model would do for it; the copy is timed too), and
    the function's ``note`` says so."""
    from torch.nn.attention import sdpa_kernel

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The backward runs the kernel the forward picked, so only the forward needs the context.
        with sdpa_kernel(backend):
            if gqa and fn.note is None:
                try:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                except RuntimeError:
                    fn.note = "kv heads expanded: this backend rejected enable_gqa"
            if gqa:
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    fn.note = None
    return fn


def _flex_causal(t: int, dev: torch.device, gqa: bool) -> Callable | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # A fresh compile cache per shape: each length (and grad mode) is another specialization, and past
    # dynamo's recompile limit flex would silently fall back to its slow unfused path.
    import torch._dynamo

    torch._dynamo.reset()
    block_mask = create_block_mask(lambda b, h, q, k: k <= q, None, None, t, t, device=dev)
    compiled = torch.compile(flex_attention, dynamic=False)
    if gqa:
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _bytes(x: torch.Tensor, fwd: int, bwd: int) -> dict[str, int]:
    """Minimum HBM traffic per pass, counted in tensors the size of x (reads + writes)."""
    unit = x.numel() * x.element_size()
    return {"fwd": fwd * unit, "fwd+bwd": (fwd + bwd) * unit}


def _case(name: str, t: int, sizes: dict[str, int], dtype: torch.dtype, dev: torch.device, timed: bool = True,
          flex: bool = True) -> dict:  # fmt: skip
    """Inputs, the Triton function, the alternatives, the reference and per-pass FLOPs / bytes.

    ``timed`` False (a correctness-only run) leaves out the SDPA / flex alternatives: nothing compares with them.
    ``flex`` False leaves out flex alone (not even compiled).
    """
    b, heads, kv_heads, head_dim = sizes["batch"], sizes["heads"], sizes["kv_heads"], sizes["head_dim"]
    hidden = heads * head_dim
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=gen)  # noqa: E731
    if name == "attention":
        q, k, v = rnd(b, heads, t, head_dim), rnd(b, kv_heads, t, head_dim), rnd(b, kv_heads, t, head_dim)
        gqa = heads != kv_heads
        alts: dict[str, Callable] = {"eager": _eager_attention}
        if timed:
            from torch.nn.attention import SDPBackend

            for label, backend in SDPA_BACKENDS:
                if hasattr(SDPBackend, backend):
                    alts[label] = _sdpa_with(getattr(SDPBackend, backend), gqa)
            flex_fn = _flex_causal(t, dev, gqa) if flex else None
            if flex_fn is not None:
                alts["flex"] = flex_fn
        fwd = 4 * b * heads * t * t * head_dim * 0.5  # two matmuls over the causal half of the scores
        return dict(inputs=[q, k, v], fn=lambda q, k, v: attention(q, k, v, causal=True), alts=alts,
                    ref=lambda q, k, v: reference.attention_reference(q, k, v, causal=True)[0],
                    flops={"fwd": fwd, "fwd+bwd": 3.5 * fwd}, nbytes={}, passes=("fwd", "fwd+bwd"),
                    shape=f"B{b} H{heads}/{kv_heads} T{t} D{head_dim}")  # fmt: skip
    if name == "rms_norm":
        x, w = rnd(b * t, hidden), torch.ones(hidden, device=dev, dtype=dtype)
        alts = {"eager": lambda x, w: reference.rms_norm_reference(x, w, 1e-6)}
        if hasattr(F, "rms_norm"):
            alts["torch_rms_norm"] = lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6)
        return dict(inputs=[x, w], fn=lambda x, w: rms_norm(x, w, 1e-6), alts=alts, ref=alts["eager"], flops={},
                    nbytes=_bytes(x, fwd=2, bwd=3), passes=("fwd", "fwd+bwd"), shape=f"N{b * t} D{hidden}")  # fmt: skip
    if name == "layer_norm":
        x, w, bias = rnd(b * t, hidden), 1 + 0.1 * rnd(hidden), 0.1 * rnd(hidden)
        eager = lambda x, w, bias: reference.layer_norm_reference(x, w, bias, 1e-5)  # noqa: E731
        alts = {"eager": eager, "torch_layer_norm": lambda x, w, bias: F.layer_norm(x, (hidden,), w, bias, 1e-5)}
        return dict(inputs=[x, w, bias], fn=lambda x, w, bias: layer_norm(x, w, bias, 1e-5), alts=alts, ref=eager,
                    flops={}, nbytes=_bytes(x, fwd=2, bwd=3), passes=("fwd", "fwd+bwd"),
                    shape=f"N{b * t} D{hidden}")  # fmt: skip
    if name == "layer_norm_modulate":
        x, shift, scale = rnd(b, t, hidden), rnd(b, hidden), 0.1 * rnd(b, hidden)
        eager = lambda x, s, c: reference.layer_norm_modulate_reference(x, s, c, 1e-6)  # noqa: E731

        def torch_modulate(x: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, (hidden,), eps=1e-6) * (1 + c[:, None]) + s[:, None]

        return dict(inputs=[x, shift, scale], fn=lambda x, s, c: layer_norm_modulate(x, s, c, 1e-6),
                    alts={"eager": eager, "torch_layer_norm": torch_modulate}, ref=eager, flops={},
                    nbytes=_bytes(x, fwd=2, bwd=3), passes=("fwd", "fwd+bwd"),
                    shape=f"B{b} T{t} D{hidden}")  # fmt: skip
    if name in ("group_norm", "group_norm_silu"):
        silu, c = name == "group_norm_silu", max(1, hidden // 4)
        groups, h = math.gcd(c, 32), 2 ** (t.bit_length() // 2)  # H x W = T, as square as powers of two allow
        h = h if t % h == 0 else 1
        x, w, bias = rnd(b, c, h, t // h), 1 + 0.1 * rnd(c), 0.1 * rnd(c)
        eager = lambda x, w, bias: reference.group_norm_reference(x, groups, w, bias, 1e-5, silu=silu)  # noqa: E731

        def torch_group_norm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            y = F.group_norm(x, groups, w, bias, 1e-5)
            return F.silu(y) if silu else y

        return dict(inputs=[x, w, bias], fn=lambda x, w, bias: group_norm(x, groups, w, bias, 1e-5, silu=silu),
                    alts={"eager": eager, "torch_group_norm": torch_group_norm}, ref=eager, flops={},
                    nbytes=_bytes(x, fwd=2, bwd=3), passes=("fwd", "fwd+bwd"),
                    shape=f"B{b} C{c} H{h} W{t // h} G{groups}")  # fmt: skip
    if name == "rope":
        q, k = rnd(b, t, heads, head_dim), rnd(b, t, kv_heads, head_dim)
        ang = torch.rand(t, head_dim // 2, device=dev, generator=gen)
        cos, sin = ang.cos(), ang.sin()
        ref = lambda q, k: reference.apply_rope_reference(q, k, cos, sin)  # noqa: E731
        qk_bytes = {p: n * (heads + kv_heads) // (2 * heads) for p, n in _bytes(q, fwd=4, bwd=4).items()}
        return dict(inputs=[q, k], fn=lambda q, k: apply_rope(q, k, cos, sin), alts={"eager": ref}, ref=ref,
                    flops={}, nbytes=qk_bytes, passes=("fwd", "fwd+bwd"),
                    shape=f"B{b} T{t} H{heads}/{kv_heads} D{head_dim}")  # fmt: skip
    if name == "swiglu":
        g, u = rnd(b * t, 4 * hidden), rnd(b * t, 4 * hidden)
        eager = lambda g, u: F.silu(g) * u  # noqa: E731
        return dict(inputs=[g, u], fn=swiglu, alts={"eager": eager}, ref=reference.swiglu_reference, flops={},
                    nbytes=_bytes(g, fwd=3, bwd=5), passes=("fwd", "fwd+bwd"),
                    shape=f"N{b * t} F{4 * hidden}")  # fmt: skip
    if name == "fused_linear_ce":
        vocab, d = sizes["vocab"], sizes["ce_hidden"]
        h, w = rnd(t, d), rnd(vocab, d) * d**-0.5
        tgt = torch.randint(0, vocab, (t,), device=dev, generator=gen)
        eager = lambda h, w: F.cross_entropy(F.linear(h, w).float(), tgt)  # noqa: E731
        return dict(inputs=[h, w], fn=lambda h, w: fused_linear_cross_entropy(h, w, tgt), alts={"eager": eager},
                    ref=lambda h, w: reference.fused_linear_cross_entropy_reference(h, w, tgt),
                    flops={"fwd+bwd": 6 * t * d * vocab}, nbytes={}, passes=("fwd+bwd",),
                    shape=f"N{t} D{d} V{vocab}")  # fmt: skip
    raise ValueError(f"unknown kernel {name!r}; choose from {KERNELS}")


def _cases(name: str, t: int, heads: int, head_dim: int, dtype: torch.dtype, dev: torch.device, **sizes: int) -> dict:
    """``_case`` with the defaults of ``run`` filled in (kept for callers that pass the basic sizes only)."""
    return _case(name, t, _sizes(t, heads, head_dim, dev, **sizes), dtype, dev, timed=dev.type == "cuda")


def _sizes(t: int, heads: int, head_dim: int, dev: torch.device, *, batch: int = 0, kv_heads: int = 0,
           vocab: int = 0, ce_hidden: int = 0) -> dict[str, int]:  # fmt: skip
    cuda = dev.type == "cuda"
    return dict(
        batch=batch or (max(1, TOKENS_PER_BATCH // t) if cuda else 1),
        heads=heads,
        kv_heads=kv_heads or heads,
        head_dim=head_dim,
        vocab=vocab or (128256 if cuda else 512),  # CPU: the interpreter checks correctness on small shapes
        ce_hidden=ce_hidden or (4096 if cuda else heads * head_dim),
    )


def _small(case: dict, name: str) -> list[torch.Tensor]:
    """Inputs for the max_err check: one batch row and at most two (query, kv) head groups, so the fp32
    reference (which materializes [T, T] scores for attention) stays small at long sequences."""
    xs = case["inputs"]
    if name == "attention":
        q, k, v = xs
        kv = min(k.shape[1], 2) if q.shape[1] == k.shape[1] else 1
        qh = kv if q.shape[1] == k.shape[1] else q.shape[1] // k.shape[1]
        return [q[:1, :qh].contiguous(), k[:1, :kv].contiguous(), v[:1, :kv].contiguous()]
    if name == "rope":
        return [x[:1].contiguous() for x in xs]
    return xs


def _backend(dev: torch.device) -> str:
    if not use_triton(torch.empty(0, device=dev)):
        return "torch-fallback"
    return "triton-interpret" if INTERPRET else "triton"


def _measure(case: dict, p: str, dev: torch.device, common: dict) -> list[dict]:
    """Time every implementation for one pass; the Triton row gets ``vs_<impl>`` = impl ms / Triton ms."""
    rows: list[dict] = []
    for impl, fn in [("triton", case["fn"]), *case["alts"].items()]:
        inputs = [x.detach().requires_grad_(p == "fwd+bwd" and x.is_floating_point()) for x in case["inputs"]]
        grads = [x for x in inputs if x.requires_grad]
        step = _step(fn, inputs, backward=p == "fwd+bwd")
        row = dict(common, impl=impl, **{"pass": p})
        error = None
        try:
            with torch.set_grad_enabled(p != "fwd"):
                ms = _time_ms(step, dev, grads)
                peak = _peak_mb(step, dev, grads)
        except Exception as exc:  # noqa: BLE001 - an unsupported alternative must not end the run
            error = f"{type(exc).__name__}: {exc}"[:300]
        if error is not None:
            # Outside the except block: its traceback kept the failed call's tensors alive. After an
            # out-of-memory error the next implementation needs that memory back.
            rows.append(dict(row, ms=None, error=error))
            del step, inputs, grads
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        flops, nbytes = case["flops"].get(p), case["nbytes"].get(p)
        if getattr(fn, "note", None):
            row["note"] = fn.note
        rows.append(dict(row, ms=ms, peak_mem_mb=peak, tflops=flops / ms / 1e9 if flops else None,
                         gbps=nbytes / ms / 1e6 if nbytes else None))  # fmt: skip
    first = rows[0]
    if first["impl"] == "triton" and first.get("ms"):
        for r in rows[1:]:
            if r.get("ms"):
                first[f"vs_{r['impl']}"] = r["ms"] / first["ms"]
        eager = next((r for r in rows if r["impl"] == "eager" and r.get("peak_mem_mb")), None)
        if eager is not None and first.get("peak_mem_mb"):
            first["mem_vs_eager"] = eager["peak_mem_mb"] / first["peak_mem_mb"]
    return rows


def run(
    kernels: list[str],
    seqs: list[int],
    heads: int,
    head_dim: int,
    dtype: str,
    device: str,
    *,
    batch: int = 0,
    kv_heads: int = 0,
    vocab: int = 0,
    ce_hidden: int = 0,
    timed: bool | None = None,
    skip: tuple[str, ...] = (),
) -> list[dict]:
    """Benchmark (CUDA) or correctness-check (CPU) each kernel at each sequence length; one row per impl.

    0 for batch / kv_heads / vocab / ce_hidden means the default described in the module docstring.
    ``timed`` defaults to "device is CUDA"; tests force it on CPU with the timers replaced. ``skip`` names
    alternatives to leave out (e.g. "flex").
    """
    dev, dt = torch.device(device), DTYPES[dtype]
    timed = dev.type == "cuda" if timed is None else timed
    rows: list[dict] = []
    for name in kernels:
        for t in seqs:
            sizes = _sizes(t, heads, head_dim, dev, batch=batch, kv_heads=kv_heads, vocab=vocab, ce_hidden=ce_hidden)
            case = _case(name, t, sizes, dt, dev, timed, flex="flex" not in skip)
            case["alts"] = {k: v for k, v in case["alts"].items() if k not in skip}
            common = dict(kernel=name, shape=case["shape"], seq=t, dtype=str(dt).removeprefix("torch."),
                          device=str(dev))  # fmt: skip
            try:
                err: float | None = _max_err(case["fn"], case["ref"], _small(case, name))
            except Exception as exc:  # noqa: BLE001 - recorded; the timing still runs
                err, common["note"] = None, f"max_err failed: {type(exc).__name__}: {exc}"[:300]
            if not timed:
                rows.append(dict(common, impl="triton", backend=_backend(dev), max_err=err, ms=None,
                                 note="CPU: correctness only (max_err vs reference, fwd+bwd), no timing"))  # fmt: skip
                continue
            for p in case["passes"]:
                measured = _measure(case, p, dev, common)
                measured[0].update(backend=_backend(dev), max_err=err)
                if name == "attention":  # the block sizes the autotuner picked for this shape and pass
                    ran = last_configs().items()
                    measured[0]["config"] = "; ".join(f"{k}: {v}" for k, v in ran if p != "fwd" or k == "fwd")
                rows += measured
            del case
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# -- reporting ---------------------------------------------------------------------------------------------


def environment(device: str) -> dict[str, str]:
    """Card, capability and software versions, for the report's header."""
    env = {"torch": torch.__version__, "python": platform.python_version()}
    if TRITON_AVAILABLE:
        import triton

        env["triton"] = triton.__version__
    dev = torch.device(device)
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        env.update(device=torch.cuda.get_device_name(dev), capability=f"sm_{major}{minor}",
                   cuda=str(torch.version.cuda))  # fmt: skip
    else:
        env["device"] = platform.processor() or platform.machine()
    return env


def write_csv(rows: list[dict], path: str) -> None:
    """Write rows to CSV; columns are the union of all row keys (first-seen order)."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list[dict]:
    """Rows written by ``write_csv``, numbers parsed back (empty cells -> None)."""

    def parse(key: str, value: str) -> Any:
        if value == "":
            return None
        if key in ("kernel", "impl", "pass", "shape", "dtype", "device", "backend", "error", "note"):
            return value
        try:
            return int(value) if key == "seq" else float(value)
        except ValueError:
            return value

    with open(path, newline="") as f:
        return [{k: parse(k, v) for k, v in r.items()} for r in csv.DictReader(f)]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def attention_table_entry(rows: list[dict]) -> int | None:
    """Shortest measured length from which Triton attention fwd+bwd beats every SDPA backend at every longer
    measured length (the value for scaletrain.ops.TRITON_ATTENTION_FASTER), or None if it never does."""
    by_seq: dict[int, bool] = {}
    for r in rows:
        if r["kernel"] == "attention" and r["impl"] == "triton" and r.get("pass") == "fwd+bwd" and r.get("ms"):
            sdpa = [r[f"vs_{label}"] for label, _ in SDPA_BACKENDS if r.get(f"vs_{label}")]
            if sdpa:
                by_seq[int(r["seq"])] = all(ratio >= 1.0 for ratio in sdpa)
    winning = None
    for seq in sorted(by_seq, reverse=True):
        if not by_seq[seq]:
            break
        winning = seq
    return winning


def markdown(rows: list[dict], env: dict[str, str]) -> str:
    """A Markdown report: environment, one table row per (kernel, pass, shape), and the goals checked."""
    lines = [" | ".join(f"{k} {v}" for k, v in env.items()), ""]
    triton_rows = [r for r in rows if r["impl"] == "triton"]
    if not any(r.get("ms") for r in triton_rows):
        lines += ["| kernel | shape | backend | max abs error vs reference (fwd+bwd) |", "|---|---|---|---|"]
        lines += [f"| {r['kernel']} | {r['shape']} | {r.get('backend')} | {_fmt(r.get('max_err'))} |"
                  for r in triton_rows]  # fmt: skip
        return "\n".join(lines + ["", "CPU: correctness only, nothing timed."]) + "\n"
    lines += [
        "| kernel | pass | shape | Triton ms | TFLOP/s or GB/s | speed-up vs (impl ms / Triton ms) | "
        "peak MiB Triton / eager | max err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in triton_rows:
        rate = f"{_fmt(r.get('tflops'))} TFLOP/s" if r.get("tflops") else f"{_fmt(r.get('gbps'))} GB/s"
        others = [o for o in rows if o["kernel"] == r["kernel"] and o.get("pass") == r.get("pass")
                  and o["shape"] == r["shape"] and o["impl"] != "triton"]  # fmt: skip
        ratios = ", ".join(
            f"{o['impl']} {r['vs_' + o['impl']]:.2f}x" if r.get(f"vs_{o['impl']}") else f"{o['impl']} failed"
            for o in others
        )
        eager_peak = next((o.get("peak_mem_mb") for o in others if o["impl"] == "eager"), None)
        lines.append(
            f"| {r['kernel']} | {r.get('pass')} | {r['shape']} | {_fmt(r.get('ms'))} | "
            f"{rate if r.get('ms') else r.get('error', 'failed')} | {ratios} | "
            f"{_fmt(r.get('peak_mem_mb'))} / {_fmt(eager_peak)} | {_fmt(r.get('max_err'), 2)} |"
        )
    lines += ["", "Goals (from issue #6):", ""] + [f"- {line}" for line in goals(rows)]
    noted = [o for o in rows if o.get("note") and o.get("ms")]
    if noted:
        lines += ["", "Notes:", ""]
        lines += [f"- {o['kernel']} {o.get('pass', '')} {o['shape']} {o['impl']}: {o['note']}" for o in noted]
    failed = [o for o in rows if o.get("error")]
    if failed:
        lines += ["", "Failed implementations (error column of the CSV):", ""]
        lines += [f"- {o['kernel']} {o.get('pass', '')} {o['shape']} {o['impl']}: {o['error'][:160]}" for o in failed]
    return "\n".join(lines) + "\n"


def _norm_goal_line(rows: list[dict], goal: str, torch_impl: str, torch_name: str) -> str:
    """The >= 1.5x-eager goal over a norm kernel's Triton rows, with the lowest ratio to torch's own op."""
    ok = all(r["vs_eager"] >= 1.5 for r in rows)
    worst = min(rows, key=lambda r: r["vs_eager"])
    torch_ratios = [r[f"vs_{torch_impl}"] for r in rows if r.get(f"vs_{torch_impl}")]
    vs_torch = f"; vs {torch_name} lowest {min(torch_ratios):.2f}x" if torch_ratios else ""
    return (f"{'MET' if ok else 'NOT MET'}: {goal} — lowest {worst['vs_eager']:.2f}x "
            f"({worst['kernel']} {worst.get('pass')} {worst['shape']}){vs_torch}")  # fmt: skip


def goals(rows: list[dict]) -> list[str]:
    """Each goal of the issue with the measured numbers and MET / NOT MET."""
    tri = [r for r in rows if r["impl"] == "triton" and r.get("ms")]
    out = []
    attn = [r for r in tri if r["kernel"] == "attention" and r.get("pass") == "fwd+bwd" and r.get("seq", 0) >= 2048]
    best = []
    for r in attn:
        sdpa = [r[f"vs_{label}"] for label, _ in SDPA_BACKENDS if r.get(f"vs_{label}")]
        if sdpa:
            best.append((r["shape"], min(sdpa)))
    if not best and any(r["kernel"] == "attention" for r in tri):
        out.append(f"not measured: attention {GOALS['attention']} (needs SDPA rows at seq >= 2048)")
    if best:
        ok = all(ratio >= 1.0 for _, ratio in best)
        detail = ", ".join(f"{shape}: {ratio:.2f}x" for shape, ratio in best)
        out.append(f"{'MET' if ok else 'NOT MET'}: attention {GOALS['attention']} — vs the fastest SDPA: {detail}")
    elem = [(r["kernel"], r.get("pass"), r["shape"], r.get("vs_eager")) for r in tri
            if r["kernel"] in ("rms_norm", "rope", "swiglu") and r.get("vs_eager")]  # fmt: skip
    if elem:
        ok = all(ratio >= 1.5 for *_, ratio in elem)
        worst = min(elem, key=lambda e: e[3])
        out.append(f"{'MET' if ok else 'NOT MET'}: {GOALS['elementwise']} — lowest {worst[3]:.2f}x "
                   f"({worst[0]} {worst[1]} {worst[2]})")  # fmt: skip
    norm = [r for r in tri if r["kernel"] in ("layer_norm", "layer_norm_modulate") and r.get("vs_eager")]
    ce = [r for r in tri if r["kernel"] == "fused_linear_ce" and r.get("vs_eager") and r.get("mem_vs_eager")]
    if ce:
        ok = all(r["mem_vs_eager"] >= 4 and r["vs_eager"] >= 0.9 for r in ce)
        detail = ", ".join(f"{r['shape']}: memory {r['mem_vs_eager']:.1f}x lower, speed {r['vs_eager']:.2f}x"
                           for r in ce)  # fmt: skip
        out.append(f"{'MET' if ok else 'NOT MET'}: fused cross-entropy {GOALS['fused_linear_ce']} — {detail}")
    # The added norms, after the original goals so their lines keep their places.
    group = [r for r in tri if r["kernel"] in ("group_norm", "group_norm_silu") and r.get("vs_eager")]
    for norm_rows, goal, torch_impl, torch_name in (
        (norm, "layer_norm", "torch_layer_norm", "F.layer_norm"),
        (group, "group_norm", "torch_group_norm", "F.group_norm (+ F.silu)"),
    ):
        if norm_rows:
            out.append(_norm_goal_line(norm_rows, GOALS[goal], torch_impl, torch_name))
    entry = attention_table_entry(rows)
    out.append(
        "model.attention=auto: Triton attention never beat every SDPA backend here; leave "
        "scaletrain.ops.TRITON_ATTENTION_FASTER without this card"
        if entry is None
        else f"model.attention=auto: add this card to scaletrain.ops.TRITON_ATTENTION_FASTER with {entry} "
        "(Triton fwd+bwd beat every SDPA backend from that length on)"
    )
    return out


def plot(rows: list[dict], path_png: str) -> bool:
    """ms vs sequence length, one panel per (kernel, pass), one line per implementation (log-log).

    Returns False (and says why) when matplotlib is missing or nothing was timed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("kernels.bench.plot: matplotlib is not installed; skipping the plot (redo it elsewhere with "
              "`python -m scaletrain.kernels.bench --from-csv kernels.csv --out DIR`)")  # fmt: skip
        return False
    timed = [r for r in rows if r.get("ms") is not None]
    if not timed:
        print("kernels.bench.plot: no timed rows (CPU runs only check correctness); skipping the plot")
        return False
    panels = list(dict.fromkeys((r["kernel"], r.get("pass", "")) for r in timed))
    cols = 2
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(11, 3.2 * math.ceil(len(panels) / cols)),
                             squeeze=False)  # fmt: skip
    for ax, (kernel, p) in zip(axes.flat, panels, strict=False):
        mine = [r for r in timed if r["kernel"] == kernel and r.get("pass", "") == p]
        for impl in dict.fromkeys(r["impl"] for r in mine):
            pts = sorted((int(r["seq"]), r["ms"]) for r in mine if r["impl"] == impl)
            ax.plot([s for s, _ in pts], [m for _, m in pts], marker="o", label=impl,
                    linewidth=2.5 if impl == "triton" else 1.2)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{kernel} {p}", fontsize=9)
        ax.set_xlabel("sequence length (tokens per row)", fontsize=8)
        ax.set_ylabel("ms (lower is better)", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict], out_dir: str, env: dict[str, str]) -> dict[str, str]:
    """kernels.csv, kernels.md and (when possible) kernels.png under out_dir; returns what was written."""
    os.makedirs(out_dir, exist_ok=True)
    written = {"csv": os.path.join(out_dir, "kernels.csv"), "md": os.path.join(out_dir, "kernels.md")}
    write_csv(rows, written["csv"])
    with open(os.path.join(out_dir, "env.json"), "w") as f:  # read back by --from-csv
        json.dump(env, f)
    with open(written["md"], "w") as f:
        f.write(markdown(rows, env))
    png = os.path.join(out_dir, "kernels.png")
    if plot(rows, png):
        written["png"] = png
    return written


def main(argv: list[str] | None = None) -> int:
    """The CLI (``scaletrain bench kernels`` calls it); returns the exit status."""
    p = argparse.ArgumentParser(prog="scaletrain bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list from {KERNELS}")
    p.add_argument("--seq", default="1024,2048,4096,8192" if torch.cuda.is_available() else "64,128",
                   help="comma list of sequence lengths")  # fmt: skip
    cuda = torch.cuda.is_available()
    p.add_argument("--heads", type=int, default=16 if cuda else 4, help="query heads (default 16 CUDA / 4 CPU)")
    p.add_argument("--kv-heads", type=int, default=0, help="attention/rope kv heads (0 = --heads; fewer: GQA)")
    p.add_argument("--head-dim", type=int, default=128 if cuda else 32, help="default 128 CUDA / 32 CPU")
    p.add_argument("--batch", type=int, default=0, help=f"0 = {TOKENS_PER_BATCH} // seq on CUDA, 1 on CPU")
    p.add_argument("--vocab", type=int, default=0, help="fused_linear_ce vocabulary (0 = 128256 CUDA / 512 CPU)")
    p.add_argument("--ce-hidden", type=int, default=0, help="fused_linear_ce width (0 = 4096 CUDA / heads*dim CPU)")
    p.add_argument("--skip", default="", help="alternatives to leave out, e.g. flex (slow to compile)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write kernels.csv, kernels.md and kernels.png into this folder")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV path")
    p.add_argument("--plot", default=None, help="also write the PNG plot to this path")
    p.add_argument("--from-csv", default=None, help="do not measure: rebuild --out's table and plot from a CSV")
    a = p.parse_args(argv)
    env = environment(a.device)
    if a.from_csv:
        rows = read_csv(a.from_csv)
        env_json = os.path.join(os.path.dirname(a.from_csv), "env.json")
        if os.path.exists(env_json):  # the machine that measured, not this one
            with open(env_json) as f:
                env = json.load(f)
    else:
        if _backend(torch.device(a.device)) == "torch-fallback":
            print("the Triton path cannot run here (no triton, or a CPU without TRITON_INTERPRET=1 set before "
                  "start): the rows check the torch fallback against itself")  # fmt: skip
        rows = run([k for k in a.kernels.split(",") if k], [int(s) for s in a.seq.split(",") if s], a.heads,
                   a.head_dim, a.dtype, a.device, batch=a.batch, kv_heads=a.kv_heads, vocab=a.vocab,
                   ce_hidden=a.ce_hidden, skip=tuple(x for x in a.skip.split(",") if x))  # fmt: skip
        for r in rows:
            print({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()})
    print(markdown(rows, env))
    if a.out:
        for kind, path in write_outputs(rows, a.out, env).items():
            print(f"wrote {kind}: {path}")
    if a.csv:
        write_csv(rows, a.csv)
    if a.plot:
        plot(rows, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
