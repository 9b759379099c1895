"""Flash attention vs the plain-torch reference (and SDPA as an independent oracle).

Tolerances: fp32 atol=rtol=1e-5 (observed max error ~1e-6 under the interpreter: same math, different
summation order). bf16 atol=rtol=3e-2, fp16 atol=rtol=5e-3 against the fp32 reference on the same
low-precision inputs (~4-8 ulps of the output dtype). Under TRITON_INTERPRET the kernels upcast dot
operands to fp32 (the interpreter's bf16 dot is wrong), so on CPU the 16-bit tests check loads, masking
and stores in those dtypes, not tensor-core rounding; on a GPU the same tests exercise the real path.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from scaletrain import kernels
from scaletrain.kernels.reference import attention_mask, attention_reference


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}

# (B, H, Hkv, T, S, D, causal, window)
CASES = [
    pytest.param(2, 4, 2, 37, 37, 32, False, None, id="gqa-noncausal-T37"),
    pytest.param(1, 4, 2, 61, 61, 16, True, None, id="gqa-causal-T61"),
    pytest.param(1, 2, 1, 37, 37, 32, True, 8, id="causal-window8"),
    pytest.param(1, 2, 2, 33, 33, 16, False, 10, id="noncausal-window10"),
    pytest.param(1, 2, 1, 20, 45, 16, True, None, id="causal-T<S-bottom-right"),
    pytest.param(1, 2, 1, 45, 20, 16, True, None, id="causal-T>S-empty-rows"),
    pytest.param(1, 2, 2, 33, 33, 64, True, None, id="D64"),
]


def _inputs(b, h, hkv, t, s, d, dtype, device, seed=0):  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


def _run(fn, q, k, v, do, dlse, **kw):  # noqa: ANN001
    """Forward + backward through both outputs; returns (out, lse, dq, dk, dv)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v, **kw)
    finite = torch.isfinite(lse)  # rows with no visible key: lse=-inf, excluded from the lse loss
    loss = (out.float() * do.float()).sum() + (torch.where(finite, lse, 0.0) * dlse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out, lse, dq, dk, dv


def _check_against_reference(b, h, hkv, t, s, d, causal, window, dtype, device):  # noqa: ANN001
    q, k, v = _inputs(b, h, hkv, t, s, d, dtype, device)
    do = torch.randn(b, h, t, d, device=device)
    dlse = torch.randn(b, h, t, device=device)

    def kern(q, k, v, **kw):  # noqa: ANN001
        return kernels.attention(q, k, v, return_lse=True, **kw)

    got = _run(kern, q, k, v, do.to(dtype), dlse, causal=causal, window=window)
    # Reference in fp32 on the same (possibly low-precision) inputs.
    want = _run(attention_reference, q.float(), k.float(), v.float(), do.to(dtype), dlse, causal=causal, window=window)
    tol = TOL[dtype]
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == (torch.float32 if name == "lse" else dtype), name
        torch.testing.assert_close(a.float(), e.float(), atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("b,h,hkv,t,s,d,causal,window", CASES)
def test_attention_fp32(b, h, hkv, t, s, d, causal, window, device):  # noqa: ANN001
    _check_against_reference(b, h, hkv, t, s, d, causal, window, torch.float32, device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 12)], ids=["causal", "window12"])
def test_attention_low_precision(dtype, causal, window, device):  # noqa: ANN001
    _check_against_reference(1, 4, 2, 37, 37, 32, causal, window, dtype, device)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 5), (False, 7)])
def test_lse_matches_logsumexp_of_masked_scores(causal, window, device):  # noqa: ANN001
    """lse checked against torch.logsumexp computed here, independently of reference.py."""
    b, h, hkv, t, s, d = 1, 4, 2, 29, 29, 16
    q, k, v = _inputs(b, h, hkv, t, s, d, torch.float32, device, seed=1)
    scale = 0.3
    _, lse = kernels.attention(q, k, v, causal=causal, scale=scale, window=window, return_lse=True)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(h // hkv, dim=1)) * scale
    q_pos = torch.arange(t, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    keep = torch.ones(t, s, dtype=torch.bool, device=device)
    if causal:
        keep &= k_pos <= q_pos
    if window is not None:
        keep &= k_pos > q_pos - window
    want = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("used", ["out", "lse"])
def test_gradient_through_one_output_only(used, device):  # noqa: ANN001
    """The unused output's gradient reaches the backward as None (not materialized): zeros are made there."""
    q, k, v = _inputs(1, 4, 2, 23, 23, 16, torch.float32, device, seed=3)
    grads = []
    for fn in (kernels.attention, attention_reference):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, lse = fn(*xs, causal=True, return_lse=True) if fn is kernels.attention else fn(*xs, causal=True)
        (out.square().sum() if used == "out" else lse.sum()).backward()
        grads.append([torch.zeros_like(x) if x.grad is None else x.grad for x in xs])  # lse does not read v
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_empty_rows_are_zero_with_minus_inf_lse(device):  # noqa: ANN001
    q, k, v = _inputs(1, 2, 1, 45, 20, 16, torch.float32, device)
    out, lse = kernels.attention(q, k, v, causal=True, return_lse=True)
    empty = ~attention_mask(45, 20, causal=True, window=None, device=device).any(-1)
    assert empty.sum() == 25
    assert torch.isneginf(lse[..., empty]).all() and torch.isfinite(lse[..., ~empty]).all()
    assert (out[..., empty, :] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa(causal, device):  # noqa: ANN001
    """Independent oracle for the reference and the kernel: PyTorch SDPA (math path on CPU)."""
    q, k, v = _inputs(1, 4, 2, 37, 37, 32, torch.float32, device, seed=2)
    out = kernels.attention(q, k, v, causal=causal)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal)
    assert max_err(out, want) < 1e-5


def test_scale_is_applied(device):  # noqa: ANN001
    q, k, v = _inputs(1, 2, 2, 17, 17, 16, torch.float32, device)
    a = kernels.attention(q, k, v, causal=False, scale=0.05)
    b = kernels.attention(q, k, v, causal=False)
    torch.testing.assert_close(a, attention_reference(q, k, v, causal=False, scale=0.05)[0], atol=1e-5, rtol=1e-5)
    assert max_err(a, b) > 1e-2


def test_under_torch_compile(device):  # noqa: ANN001
    """The custom op traces with fake tensors and its registered autograd (aot_eager: no codegen on CPU)."""
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 1, 19, 19, 16, torch.float32, device))

    @torch.compile(backend="aot_eager" if device.type == "cpu" else "inductor", fullgraph=True)
    def f(q, k, v):  # noqa: ANN001
        return kernels.attention(q, k, v, causal=True, window=6).square().sum()

    f(q, k, v).backward()
    want = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    attention_reference(*want, causal=True, window=6)[0].square().sum().backward()
    for got_x, want_x in zip((q, k, v), want, strict=True):
        torch.testing.assert_close(got_x.grad, want_x.grad, atol=1e-5, rtol=1e-5)


def test_rejects_bad_shapes(device):  # noqa: ANN001
    q, k, v = _inputs(1, 3, 2, 8, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="Hkv must divide H"):
        kernels.attention(q, k, v, causal=False)
    q, k, v = _inputs(1, 2, 2, 8, 8, 24, torch.float32, device)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.attention(q, k, v, causal=False)


# -- launch configs: autotune space, pruning, fixed fallback ------------------------------------------------
attention_module = importlib.import_module("scaletrain.kernels.attention")  # ``kernels.attention`` is the function


@pytest.mark.parametrize("bm,bn", [(32, 64), (64, 32), (128, 32), (32, 128)])
def test_unequal_tiles(bm, bn, device, monkeypatch):  # noqa: ANN001
    """The autotune space mixes BLOCK_M < BLOCK_N (dK/dV) and > (forward, dQ): no kernel may assume a relation.
    Runs every kernel with these tiles (fixed path; the interpreter ignores warps and stages)."""
    if device.type != "cpu":
        pytest.skip("on a GPU the autotuner runs (and other tests check) these tiles")
    config = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2)
    monkeypatch.setattr(attention_module, "_fixed_config", lambda kernel, head_dim, dtype: config)
    _check_against_reference(1, 2, 1, 150, 150, 16, True, 40, torch.float32, device)
    _check_against_reference(1, 2, 1, 70, 150, 16, False, None, torch.float32, device)


def test_autotune_off_under_interpreter_and_last_configs(device):  # noqa: ANN001
    if device.type != "cpu":
        pytest.skip("CPU (interpreter) behaviour")
    assert not attention_module.autotune_enabled()
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 1, 19, 19, 16, torch.float32, device))
    kernels.attention(q, k, v, causal=True).sum().backward()
    fixed = "BLOCK_M=16 BLOCK_N=16 warps=1 stages=1 (fixed)"
    assert attention_module.last_configs() == {"fwd": fixed, "dkdv": fixed, "dq": fixed}


def _prune(kernel, dtype=torch.bfloat16, d=128, t=4096, s=4096, budget=227 * 1024):  # noqa: ANN001, ANN202
    space = attention_module.autotune_space(kernel)
    return space, attention_module.prune_configs(
        kernel, space, head_dim=d, dtype=dtype, t_bucket=t, s_bucket=s, budget=budget
    )


def _tile(c) -> tuple:  # noqa: ANN001
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_prune_configs(kernel, monkeypatch):  # noqa: ANN001
    A = attention_module
    monkeypatch.setattr(A, "INTERPRET", False)  # the GPU's fixed configs
    for d in (16, 32, 64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            space, kept = _prune(kernel, dtype, d)
            est = {_tile(c): A.shared_mem_estimate(kernel, *_tile(c)[:2], d, 2, c.num_stages) for c in space}
            assert [_tile(c) for c in kept] == [t for t in map(_tile, space) if est[t] <= 227 * 1024]
            fixed = A._fixed_config(kernel, d, dtype)
            assert (fixed["BLOCK_M"], fixed["BLOCK_N"], fixed["num_warps"], fixed["num_stages"]) in est
        # fp32: the fixed config only (not tuned)
        _, kept = _prune(kernel, torch.float32, d)
        fixed = A._fixed_config(kernel, d, torch.float32)
        assert [_tile(c) for c in kept] == [
            (fixed["BLOCK_M"], fixed["BLOCK_N"], fixed["num_warps"], fixed["num_stages"])
        ]
    # a smaller budget (e.g. an A100's 163 KB) keeps a strict, non-empty subset
    space, kept = _prune(kernel, budget=163 * 1024)
    assert 0 < len(kept) < len(space)
    # short sequences: only tiles within the bucketed lengths; nothing fits -> the single smallest tile
    _, kept = _prune(kernel, t=64, s=64)
    assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)
    _, kept = _prune(kernel, t=16, s=16)
    assert len(kept) == 1
    # symbolic lengths (dynamic shapes): no length pruning; never empty, even with no shared memory at all
    assert len(_prune(kernel, t=object(), s=object())[1]) == len(_prune(kernel)[1])
    assert len(_prune(kernel, budget=0)[1]) == 1


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_autotuner_wiring(kernel):  # noqa: ANN001
    """The autotuner's key names are kernel arguments and its pruner reads the arguments it is launched with."""
    tuner = attention_module.autotuned_kernel(kernel)
    assert set(attention_module.AUTOTUNE_KEY) <= set(tuner.arg_names)
    assert not tuner.reset_to_zero and not tuner.restore_value  # outputs are overwritten, never accumulated
    q, lse = torch.empty(1, 2, 100, 128, dtype=torch.bfloat16), torch.empty(1, 2, 100)
    tensors = {"fwd": (q, q, q, q, lse), "dkdv": (q, q, q, q, lse, lse, q, q), "dq": (q, q, q, q, lse, lse, q)}
    scalars = (0.1,) if kernel == "fwd" else (0.1, 0.1)
    args = (*tensors[kernel], *scalars, 100, 100, 2, 1, 0, 0, 128, 128)
    named = dict(zip(tuner.arg_names, args, strict=False))
    assert named["T_BUCKET"] == 128 and named["HKV"] == 1
    constexprs = dict(HEAD_DIM=128, CAUSAL=True, WINDOWED=False, UPCAST=False, PREC="tf32")
    kept = tuner.early_config_prune(tuner.configs, named, **constexprs)
    assert [_tile(c) for c in kept] == [_tile(c) for c in _prune(kernel, t=128, s=128)[1]]
