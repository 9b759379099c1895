"""Benchmark the fused kernels against PyTorch alternatives measured in the same run.

``run(kernels, seqs, heads, head_dim, dtype, device)`` returns one dict per (kernel, implementation, pass,
shape) with: kernel, impl, pass, shape, dtype, device, backend, ms, tflops, gbps, peak_mem_mb, max_err and,
on the Triton row, ``vs_<impl>`` = that implementation's ms / Triton's ms (> 1 means Triton is faster).

Shapes per sequence length T (hidden = heads * head_dim):
  attention          q/k/v [1, heads, T, head_dim], causal; alternatives: eager reference, SDPA with each
                     backend (flash / efficient / cudnn, CUDA only), flex_attention (compiled, if available)
  rms_norm           x [T, hidden]; alternatives: eager reference, torch.nn.functional.rms_norm
  rope               q/k [1, T, heads, head_dim]; alternative: eager reference
  swiglu             gate/up [T, 4 * hidden]; alternative: eager reference
  fused_linear_ce    hidden [T, hidden], vocab 32768 (CUDA) / 512 (CPU); alternative: eager (full logits)

On CPU nothing is timed: Triton runs only through the interpreter (set TRITON_INTERPRET=1 before
importing kernels), so rows carry max_err against the reference and ms=None. ``backend`` says whether
the Triton path actually ran ("triton", "triton-interpret") or the torch fallback did ("torch-fallback").

CLI: python -m kernels.bench --kernels attention,rms_norm --seq 128,256 --heads 8 --head-dim 64 \
         --dtype bf16 --device cuda --csv bench.csv --plot bench.png
"""

import argparse
import csv
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import reference
from ._triton import INTERPRET, TRITON_AVAILABLE, use_triton
from .attention import attention
from .fused_linear_ce import fused_linear_cross_entropy
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

KERNELS = ("attention", "rms_norm", "rope", "swiglu", "fused_linear_ce")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def _time_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 3, reps: int = 10) -> tuple[float, float]:
    """Median ms per call and peak extra memory (MiB) on CUDA, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return sorted(times)[len(times) // 2], peak


def _fwd_bwd(fn: Callable[..., Any], inputs: list[torch.Tensor]) -> Callable[[], Any]:
    """Closure running forward and backward (sum of outputs, fixed upstream grad of ones)."""

    def step() -> None:
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        outs = [o for o in outs if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

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


def _bytes(x: torch.Tensor, fwd: int, bwd: int) -> dict[str, int]:
    """HBM traffic per pass, counted in tensors the size of x (reads + writes)."""
    unit = x.numel() * x.element_size()
    return {"fwd": fwd * unit, "fwd+bwd": (fwd + bwd) * unit}


def _cases(name: str, t: int, heads: int, head_dim: int, dtype: torch.dtype, dev: torch.device) -> dict:
    """Inputs, the Triton function, alternatives, per-pass FLOPs / bytes for one kernel at one length."""
    return {"passes": ("fwd", "fwd+bwd"), **_case(name, t, heads, head_dim, dtype, dev)}


def _case(name: str, t: int, heads: int, head_dim: int, dtype: torch.dtype, dev: torch.device) -> dict:
    hidden = heads * head_dim
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
    if name == "attention":
        q, k, v = rnd(1, heads, t, head_dim), rnd(1, heads, t, head_dim), rnd(1, heads, t, head_dim)
        alts: dict[str, Callable] = {"eager": lambda q, k, v: reference.attention_reference(q, k, v, causal=True)[0]}
        if dev.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                   ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                                   ("sdpa_cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None))):  # fmt: skip
                if backend is not None:
                    alts[label] = _sdpa_with(backend, sdpa_kernel)
            flex = _flex_causal(t, dev)
            if flex is not None:
                alts["flex"] = flex
        fwd = 4 * heads * t * t * head_dim * 0.5  # two matmuls, causal: half the score matrix
        return dict(inputs=[q, k, v], fn=lambda q, k, v: attention(q, k, v, causal=True), alts=alts,
                    ref=alts["eager"], flops={"fwd": fwd, "fwd+bwd": 3.5 * fwd}, nbytes={},
                    shape=f"B1 H{heads} T{t} D{head_dim}")  # fmt: skip
    if name == "rms_norm":
        x, w = rnd(t, hidden), torch.ones(hidden, device=dev, dtype=dtype)
        alts = {"eager": lambda x, w: reference.rms_norm_reference(x, w, 1e-6)}
        if hasattr(F, "rms_norm"):
            alts["torch_rms_norm"] = lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6)
        return dict(inputs=[x, w], fn=lambda x, w: rms_norm(x, w, 1e-6), alts=alts, ref=alts["eager"], flops={},
                    nbytes=_bytes(x, fwd=2, bwd=3), shape=f"N{t} D{hidden}")  # fmt: skip
    if name == "rope":
        q, k = rnd(1, t, heads, head_dim), rnd(1, t, heads, head_dim)
        ang = torch.rand(t, head_dim // 2, device=dev)
        cos, sin = ang.cos(), ang.sin()
        ref = lambda q, k: reference.apply_rope_reference(q, k, cos, sin)  # noqa: E731
        return dict(inputs=[q, k], fn=lambda q, k: apply_rope(q, k, cos, sin), alts={"eager": ref}, ref=ref,
                    flops={}, nbytes=_bytes(q, fwd=4, bwd=4), shape=f"B1 T{t} H{heads} D{head_dim}")
    if name == "swiglu":
        g, u = rnd(t, 4 * hidden), rnd(t, 4 * hidden)
        return dict(inputs=[g, u], fn=swiglu, alts={"eager": reference.swiglu_reference},
                    ref=reference.swiglu_reference, flops={}, nbytes=_bytes(g, fwd=3, bwd=5),
                    shape=f"N{t} F{4 * hidden}")  # fmt: skip
    if name == "fused_linear_ce":
        vocab = 32768 if dev.type == "cuda" else 512
        h, w = rnd(t, hidden), rnd(vocab, hidden) * hidden**-0.5
        tgt = torch.randint(0, vocab, (t,), device=dev)
        return dict(inputs=[h, w], fn=lambda h, w: fused_linear_cross_entropy(h, w, tgt),
                    alts={"eager": lambda h, w: reference.fused_linear_cross_entropy_reference(h, w, tgt)},
                    ref=lambda h, w: reference.fused_linear_cross_entropy_reference(h, w, tgt),
                    flops={"fwd+bwd": 6 * t * hidden * vocab}, nbytes={}, passes=("fwd+bwd",),
                    shape=f"N{t} D{hidden} V{vocab}")  # fmt: skip
    raise ValueError(f"unknown kernel {name!r}; choose from {KERNELS}")


def _sdpa_with(backend: Any, sdpa_kernel: Any) -> Callable:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return fn


def _flex_causal(t: int, dev: torch.device) -> Callable | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    block_mask = create_block_mask(lambda b, h, q, k: k <= q, None, None, t, t, device=dev)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _backend(dev: torch.device) -> str:
    if not use_triton(torch.empty(0, device=dev)):
        return "torch-fallback"
    return "triton-interpret" if INTERPRET else "triton"


def _measure(case: dict, p: str, dev: torch.device, common: dict) -> list[dict]:
    """Time every implementation for one pass; the Triton row gets ``vs_<impl>`` = impl ms / Triton ms."""
    rows: list[dict] = []
    for impl, fn in [("triton", case["fn"]), *case["alts"].items()]:
        inputs = [x.detach().requires_grad_(p == "fwd+bwd") for x in case["inputs"]]
        step = (lambda fn=fn, inputs=inputs: fn(*inputs)) if p == "fwd" else _fwd_bwd(fn, inputs)
        row = dict(common, impl=impl, **{"pass": p})
        try:
            with torch.set_grad_enabled(p != "fwd"):
                ms, peak = _time_ms(step, dev)
        except Exception as exc:  # noqa: BLE001 - an unsupported alternative must not kill the run
            rows.append(dict(row, ms=None, error=repr(exc)[:200]))
            continue
        flops, nbytes = case["flops"].get(p), case["nbytes"].get(p)
        rows.append(dict(row, ms=ms, peak_mem_mb=peak, tflops=flops / ms / 1e9 if flops else None,
                         gbps=nbytes / ms / 1e6 if nbytes else None))  # fmt: skip
    triton_ms = rows[0].get("ms") if rows and rows[0]["impl"] == "triton" else None
    if triton_ms:
        for r in rows[1:]:
            if r.get("ms"):
                rows[0][f"vs_{r['impl']}"] = r["ms"] / triton_ms
    return rows


def run(kernels: list[str], seqs: list[int], heads: int, head_dim: int, dtype: str, device: str) -> list[dict]:
    """Benchmark (CUDA) or correctness-check (CPU) each kernel at each sequence length; one row per impl."""
    dev, dt = torch.device(device), DTYPES[dtype]
    rows: list[dict] = []
    for name in kernels:
        for t in seqs:
            case = _cases(name, t, heads, head_dim, dt, dev)
            common = dict(kernel=name, shape=case["shape"], dtype=str(dt).removeprefix("torch."), device=str(dev))
            err = _max_err(case["fn"], case["ref"], case["inputs"])
            if dev.type != "cuda":
                rows.append(dict(common, impl="triton", backend=_backend(dev), max_err=err, ms=None,
                                 note="CPU: correctness only (max_err vs reference, fwd+bwd), no timing"))  # fmt: skip
                continue
            for p in ("fwd", "fwd+bwd"):
                if p in case["passes"]:
                    measured = _measure(case, p, dev, common)
                    measured[0].update(backend=_backend(dev), max_err=err)
                    rows += measured
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    """Write rows to CSV; columns are the union of all row keys (first-seen order)."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path_png: str) -> bool:
    """Bar chart of ms per (kernel, pass, shape) and implementation. Returns False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("kernels.bench.plot: matplotlib is not installed; skipping the plot")
        return False
    timed = [r for r in rows if r.get("ms") is not None]
    if not timed:
        print("kernels.bench.plot: no timed rows (CPU runs only check correctness); skipping the plot")
        return False
    groups = list(dict.fromkeys(f"{r['kernel']} {r.get('pass', '')}\n{r['shape']}" for r in timed))
    impls = list(dict.fromkeys(r["impl"] for r in timed))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, impl in enumerate(impls):
        ms = {f"{r['kernel']} {r.get('pass', '')}\n{r['shape']}": r["ms"] for r in timed if r["impl"] == impl}
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [ms.get(g, math.nan) for g in groups], width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
    ax.set_ylabel("ms (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list from {KERNELS}")
    p.add_argument("--seq", default="128,256", help="comma list of sequence lengths")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=None, help="write rows to this CSV path")
    p.add_argument("--plot", default=None, help="write a PNG bar chart to this path")
    a = p.parse_args(argv)
    if not TRITON_AVAILABLE:
        print("triton is not installed: rows measure the torch fallback")
    rows = run([k for k in a.kernels.split(",") if k], [int(s) for s in a.seq.split(",") if s], a.heads,
               a.head_dim, a.dtype, a.device)  # fmt: skip
    for r in rows:
        print({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()})
    if a.csv:
        write_csv(rows, a.csv)
    if a.plot:
        plot(rows, a.plot)
    return rows


if __name__ == "__main__":
    main()
