"""GroupNorm (+ fused SiLU) kernels (scaletrain/kernels/group_norm.py) vs the plain-torch reference and F.group_norm
(+ F.silu):
the output and the gradient of every input (x, weight, bias), with and without the SiLU.

Tolerances: rtol = atol = 1e-5 on fp32 outputs and rtol 1e-5 / atol 4e-5 on fp32 gradients (the weight / bias
gradients are sums over batch and positions, so their rounding adds up; 1e-4 for the 65536-element groups); bf16
2e-2 and fp16 2e-3 on outputs, atol 4x that on gradients — both sides compute in fp32 from the same 16-bit inputs
and round once, so they differ by ~1 ulp of the output dtype (bf16 2^-8, fp16 2^-11 relative). Observed (printed
with -s), max |fused - reference| over the output and every gradient: fp32 <= 3.8e-6 absolute (1.5e-5 on the
4096-position weight / bias sums of the large-group case, 2e-7 of the largest value there), fp16 0 (bit-equal on
these inputs), bf16 <= 3.1e-2 absolute, 6.9e-3 of the largest value (~2 ulps).

Sizes: odd channels per group and odd spatial sizes (C=12, G=3 over 5x7; C=6, G=6; C=10, G=5), 1-D / 2-D / 3-D
spatial and none ([B, C]); a 65536-element group (512 channels / 32 groups x 64x64, here C=32, G=2) that the
kernels cover with a loop of tiles split over two programs per group; and, with the tile size shrunk, every
layout branch: several tiles per program, spatial splits with a partial last run, groups packed several to a tile.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from st_common import KernelOps

from scaletrain import kernels
from scaletrain.kernels import reference

gn = importlib.import_module("scaletrain.kernels.group_norm")  # the package attribute is the function, not the module

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]  # fmt: skip
SILU = [pytest.param(False, id="plain"), pytest.param(True, id="silu")]
OPS = {"group_norm_fwd", "group_norm_bwd"}


def _inputs(shape, groups, affine, dtype, device, seed=0, wdtype=None):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(seed)
    x = (2 + 3 * torch.randn(*shape, generator=g)).to(device, dtype)  # mean far from 0: the centring matters
    c, wdtype = shape[1], wdtype or dtype
    w = (1 + 0.3 * torch.randn(c, generator=g)).to(device, wdtype) if "weight" in affine else None
    b = (0.5 * torch.randn(c, generator=g)).to(device, wdtype) if "bias" in affine else None
    return [x, w, b]


def _torch(groups: int, silu: bool, eps: float = 1e-5, fp64: bool = False):  # noqa: ANN202
    """What the recipes run unfused: F.group_norm, then F.silu; with fp64, computed in float64 and returned in
    x's dtype (an exact reference: F.group_norm's own fp32 CPU backward is off by 5.6e-5 on 2-element groups,
    whose dx is nearly all cancellation, where the kernel is within 3.2e-7 of float64)."""

    def fn(x, w, b):  # noqa: ANN001, ANN202
        xc, wc, bc = (t.double() if fp64 and t is not None else t for t in (x, w, b))
        y = F.group_norm(xc, groups, wc, bc, eps)
        return (F.silu(y) if silu else y).to(x.dtype)

    return fn


def _compare(name, groups, silu, inputs, dtype, ref=None, grad_atol=None):  # noqa: ANN001, ANN202
    """Forward + backward of the kernel and of ref (default: the fp32 reference) with the same upstream gradient;
    returns the max absolute difference over the output and the gradients."""
    ref = ref or (lambda x, w, b: reference.group_norm_reference(x, groups, w, b, 1e-5, silu=silu))
    a = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    b = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    with KernelOps() as ops_seen:
        out_a = kernels.group_norm(*a[:1], groups, *a[1:], 1e-5, silu=silu)
        up = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(7)).to(out_a.device, out_a.dtype)
        out_a.backward(up)
    assert OPS <= ops_seen.names, f"the Triton ops did not run: {ops_seen.names}"
    out_b = ref(*b)
    out_b.backward(up)
    tol = TOL[dtype]
    assert out_a.dtype == out_b.dtype == inputs[0].dtype and out_a.shape == inputs[0].shape
    torch.testing.assert_close(out_a.float(), out_b.float(), atol=tol, rtol=tol)
    pairs = [(out_a, out_b)]
    for i, (ta, tb) in enumerate(zip(a, b, strict=True)):
        if ta is None:
            continue
        assert ta.grad is not None and ta.grad.dtype == ta.dtype, f"input {i}: gradient missing or wrong dtype"
        atol, msg = grad_atol or 4 * tol, lambda m, i=i: f"grad {i}: {m}"
        torch.testing.assert_close(ta.grad.float(), tb.grad.float(), atol=atol, rtol=tol, msg=msg)
        pairs.append((ta.grad, tb.grad))
    err = max((p.float() - q.float()).abs().max().item() for p, q in pairs)
    rel = max(((p.float() - q.float()).abs().max() / q.float().abs().max().clamp(min=1)).item() for p, q in pairs)
    print(f"{name}: max |fused - reference| over output and grads = {err:.2e} ({rel:.2e} of the largest value)")
    return err


@pytest.mark.parametrize("silu", SILU)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm(dtype, silu, device):  # noqa: ANN001
    """C=12 in 3 groups over 5x7: 4 channels x 35 positions per group (neither a power of two)."""
    inputs = _inputs((2, 12, 5, 7), 3, "weight+bias", dtype, device)
    _compare(f"group_norm {dtype} silu={silu}", 3, silu, inputs, dtype)


@pytest.mark.parametrize("silu", SILU)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_group_norm_without_full_affine(affine, silu, device):  # noqa: ANN001
    inputs = _inputs((2, 12, 5, 7), 3, affine, torch.float32, device, seed=1)
    _compare(f"group_norm affine={affine} silu={silu}", 3, silu, inputs, torch.float32)


SHAPES = {
    "1d-C6-G6": ((3, 6, 10), 6),  # one channel per group
    "2d-C12-G3": ((2, 12, 5, 7), 3),
    "3d-C8-G4": ((2, 8, 3, 4, 5), 4),
    "no-spatial": ((4, 6), 2),
    "1x1": ((2, 4, 1, 1), 2),
}


@pytest.mark.parametrize("silu", SILU)
@pytest.mark.parametrize("case", list(SHAPES))
def test_shapes_match_torch(case, silu, device):  # noqa: ANN001
    """Against F.group_norm (+ F.silu) itself (in float64), fp32: 1-D / 2-D / 3-D spatial and none."""
    shape, groups = SHAPES[case]
    inputs = _inputs(shape, groups, "weight+bias", torch.float32, device, seed=2)
    ref = _torch(groups, silu, fp64=True)
    _compare(f"group_norm {case} silu={silu}", groups, silu, inputs, torch.float32, ref=ref)


def test_large_group_is_covered_by_a_loop_of_tiles(device, monkeypatch):  # noqa: ANN001
    """65536 elements per group (16 channels x 64x64, as 512 channels / 32 groups in a U-Net at 64x64): more than
    any tile, so each group is walked tile by tile, and split over several programs along the spatial axis when
    the device wants many more programs than there are groups (16 here, as a 4-SM GPU would: 2 groups x 2
    splits)."""
    monkeypatch.setattr(gn, "_target_programs", lambda device: 16)
    p = gn._plan(2, 16, 4096, device)
    assert p["block_s"] < 4096 and p["block_r"] == 1 and p["splits"] == 2, p
    inputs = _inputs((1, 32, 64, 64), 2, "weight+bias", torch.float32, device, seed=3)
    err = _compare("group_norm 1x32x64x64 G=2 silu", 2, True, inputs, torch.float32, grad_atol=1e-4)
    assert err < 1e-4


LAYOUTS = {  # shape, groups, programs wanted, what the shrunk tiles (16 positions, 64 elements) must make of it
    "tiles-per-program": ((3, 10, 7, 9), 5, 16, lambda p: p["splits"] == 1 and p["block_s"] == 16),
    "spatial-splits": ((1, 6, 7, 9), 2, 16, lambda p: p["splits"] == 2 and p["spatial_per_program"] == 32),
    "packed-groups": ((9, 4, 2, 3), 4, 4, lambda p: p["block_r"] == 8),  # 36 groups: the last tile is partial
}


@pytest.mark.parametrize("silu", SILU)
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_every_layout_branch_with_small_tiles(case, silu, device, monkeypatch):  # noqa: ANN001
    """Tiles shrunk to 64 elements / 16 positions so small inputs take every branch of the program layout:
    several tiles per program in one pass (last one partial), spatial splits whose last run is shorter (63 = 32 +
    31 positions; the two-launch forward and backward), and 8 groups packed per tile with a partial last row
    block."""
    monkeypatch.setattr(gn, "TILE", 64)
    monkeypatch.setattr(gn, "INTERPRET_TILE", 64)
    monkeypatch.setattr(gn, "MAX_BLOCK_S", 16)
    shape, groups, programs, expect = LAYOUTS[case]
    monkeypatch.setattr(gn, "_target_programs", lambda device: programs)
    b, c, s, cpg = gn._layout(torch.empty(shape), groups)
    plan = gn._plan(b * groups, cpg, s, device)
    assert expect(plan), plan
    inputs = _inputs(shape, groups, "weight+bias", torch.float32, device, seed=4)
    _compare(f"group_norm {case} silu={silu}", groups, silu, inputs, torch.float32, ref=_torch(groups, silu, fp64=True))


def test_mixed_dtypes_and_channels_last(device):  # noqa: ANN001
    """bf16 activations with fp32 weight / bias (each gradient in its input's dtype), and a channels_last x
    (copied to NCHW first; the result equals F.group_norm's)."""
    inputs = _inputs((2, 12, 5, 7), 3, "weight+bias", torch.bfloat16, device, seed=5, wdtype=torch.float32)
    _compare("group_norm bf16 x, fp32 affine", 3, True, inputs, torch.bfloat16)
    x, w, b = _inputs((2, 12, 5, 7), 3, "weight+bias", torch.float32, device, seed=6)
    x = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(kernels.group_norm(x, 3, w, b, silu=True), _torch(3, True)(x, w, b))


def test_eps_and_centring_matter(device):  # noqa: ANN001
    x = 5 + 1e-3 * torch.randn(2, 8, 4, 4, device=device)
    torch.testing.assert_close(kernels.group_norm(x, 4, None, None, 1e-2), F.group_norm(x, 4, eps=1e-2))
    assert (kernels.group_norm(x, 4, None, None, 1e-2) - kernels.group_norm(x, 4, None, None, 1e-8)).abs().max() > 0.1


def test_forward_and_backward_are_deterministic(device, monkeypatch):  # noqa: ANN001
    """Per-program partial sums combined in a fixed order (no atomics): two calls agree bit for bit, also with
    a group split over several programs. Absent weight / bias give empty placeholder gradients."""
    monkeypatch.setattr(gn, "_target_programs", lambda device: 16)  # 2 groups: split in 2 (3 tiles of 1024)
    assert gn._plan(2, 3, 48 * 48, device)["splits"] == 2
    g = torch.Generator().manual_seed(8)
    x, dy = torch.randn(1, 6, 48, 48, generator=g).to(device), torch.randn(1, 6, 48, 48, generator=g).to(device)
    w, b = torch.randn(6, generator=g).to(device), torch.randn(6, generator=g).to(device)
    first = gn.group_norm_fwd(x, w, b, 2, 1e-5, True)
    second = gn.group_norm_fwd(x, w, b, 2, 1e-5, True)
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    _, mean, rstd = first
    torch.testing.assert_close(mean, x.view(1, 2, -1).mean(-1))
    back = [gn.group_norm_bwd(dy, x, w, b, mean, rstd, 2, True) for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(*back, strict=True))
    dx, dw, db = gn.group_norm_bwd(dy, x, None, None, mean, rstd, 2, False)
    assert dx.shape == x.shape and dw.numel() == 0 and db.numel() == 0


def test_errors_name_the_argument(device):  # noqa: ANN001
    x = torch.randn(2, 6, 4, device=device)
    with pytest.raises(ValueError, match=r"num_groups 4 must divide the 6 channels"):
        kernels.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight shape \(4,\) must be \(6,\)"):
        kernels.group_norm(x, 3, torch.ones(4, device=device))
    with pytest.raises(ValueError, match=r"x must be \[B, C, \*spatial\]"):
        kernels.group_norm(torch.randn(6, device=device), 3)


def test_group_norm_ops_under_torch_compile(device):  # noqa: ANN001
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    x = torch.randn(2, 8, 5, 6, device=device, requires_grad=True)
    w, b = torch.randn(8, device=device, requires_grad=True), torch.randn(8, device=device, requires_grad=True)

    @torch.compile(backend=backend, fullgraph=True)
    def f(x, w, b):  # noqa: ANN001
        return (kernels.group_norm(x, 4, w, b, silu=True) * kernels.group_norm(x, 2, w, None)).sum()

    f(x, w, b).backward()
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    x2, w2, b2 = leaves
    (reference.group_norm_reference(x2, 4, w2, b2, 1e-5, silu=True) * reference.group_norm_reference(
        x2, 2, w2, None, 1e-5)).sum().backward()  # fmt: skip
    for got, want in zip((x, w, b), leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_fallback_without_triton_is_the_reference(monkeypatch):  # noqa: ANN001
    monkeypatch.setattr(gn, "use_triton", lambda *t: False)
    x, w, b = torch.randn(2, 6, 3, 3), torch.randn(6), torch.randn(6)
    with KernelOps() as ops_seen:
        out = kernels.group_norm(x, 3, w, b, silu=True)
    assert not ops_seen.names
    torch.testing.assert_close(out, reference.group_norm_reference(x, 3, w, b, 1e-5, silu=True))
    torch.testing.assert_close(out, F.silu(F.group_norm(x, 3, w, b)))


def test_bench_rows_and_goal_line(monkeypatch, device):  # noqa: ANN001
    """kernels.bench (``scaletrain bench kernels``) times group_norm and group_norm_silu against eager and
    F.group_norm (+ F.silu) in the same run, reports GB/s, and adds a goal line (>= 1.5x eager) before the
    auto-attention line. CUDA timers are replaced by the wall clock here, so the numbers mean nothing; the flow
    is what is tested."""
    import time

    from scaletrain.kernels import bench

    def wall_clock(step, dev, grads=None):  # noqa: ANN001
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(bench, "_time_ms", wall_clock)
    monkeypatch.setattr(bench, "_peak_mb", lambda step, dev, grads: 1.0)
    names = ["group_norm", "group_norm_silu"]
    rows = bench.run(names, [16], heads=2, head_dim=24, dtype="fp32", device=str(device), timed=True)
    triton = [r for r in rows if r["impl"] == "triton"]
    assert [(r["kernel"], r["pass"]) for r in triton] == [(k, p) for k in names for p in ("fwd", "fwd+bwd")]
    assert {r["impl"] for r in rows} == {"triton", "eager", "torch_group_norm"}
    for r in triton:
        assert r["max_err"] < 1e-5 and r["gbps"] > 0 and r["vs_eager"] > 0 and r["vs_torch_group_norm"] > 0, r
    assert {r["shape"] for r in triton} == {"B1 C12 H4 W4 G4"}
    line = bench.goals(rows)[-2]  # the auto-attention line stays last
    assert line.split(":")[0] in ("MET", "NOT MET") and "group_norm / group_norm_silu >= 1.5x eager" in line
    assert "vs F.group_norm (+ F.silu) lowest" in line
