"""Flash attention vs the plain-torch reference (and SDPA as an independent oracle).

Tolerances: fp32 atol=rtol=1e-5 (observed max error ~1e-6 under the interpreter: same math, different
summation order). bf16 atol=rtol=3e-2, fp16 atol=rtol=5e-3 against the fp32 reference on the same
low-precision inputs (~4-8 ulps of the output dtype). Under TRITON_INTERPRET the kernels upcast dot
operands to fp32 (the interpreter's bf16 dot is wrong), so on CPU the 16-bit tests check loads, masking
and stores in those dtypes, not tensor-core rounding; on a GPU the same tests exercise the real path.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.reference import attention_mask, attention_reference


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
