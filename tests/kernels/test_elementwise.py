"""RMSNorm, RoPE and SwiGLU kernels vs their plain-torch references: outputs and every input gradient.

Tolerances: fp32 atol=rtol=1e-5 (observed <= 6e-6; the kernels do the same fp32 math in another order).
bf16 atol=rtol=2e-2 and fp16 atol=rtol=2e-3: both sides compute in fp32 from the same 16-bit inputs and
round once at the end, so differences are ~1 ulp of the output dtype (bf16 ulp 2^-8, fp16 2^-11 relative).
Odd sizes (37 rows, 100/300 features, 3 heads) exercise the masked tails.
"""

import pytest
import torch

from scaletrain import kernels
from scaletrain.kernels import reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]  # fmt: skip


def _compare(fn, ref, inputs, dtype):  # noqa: ANN001
    """Forward + backward with the same random upstream grads; compares outputs and input grads."""
    a = [x.detach().clone().requires_grad_() for x in inputs]
    b = [x.detach().clone().requires_grad_() for x in inputs]
    out_a, out_b = fn(*a), ref(*b)
    out_a = out_a if isinstance(out_a, tuple) else (out_a,)
    out_b = out_b if isinstance(out_b, tuple) else (out_b,)
    g = torch.Generator().manual_seed(7)
    ups = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in out_b]
    torch.autograd.backward(out_a, ups)
    torch.autograd.backward(out_b, ups)
    tol = TOL[dtype]
    for oa, ob in zip(out_a, out_b, strict=True):
        assert oa.dtype == ob.dtype
        torch.testing.assert_close(oa.float(), ob.float(), atol=tol, rtol=tol)
    for i, (xa, xb) in enumerate(zip(a, b, strict=True)):
        # 4x atol on grads: dweight is a sum over rows, so its rounding differences add up.
        assert xa.grad is not None, f"input {i} got no gradient"
        torch.testing.assert_close(xa.grad.float(), xb.grad.float(), atol=tol * 4, rtol=tol, msg=f"grad {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype, device):  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 100, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(100, generator=g)).to(device, dtype)
    _compare(lambda x, w: kernels.rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm_reference(x, w, 1e-5),
             [x, w], dtype)  # fmt: skip


def test_rms_norm_eps_matters(device):  # noqa: ANN001
    x = 1e-3 * torch.randn(5, 64, device=device)
    w = torch.ones(64, device=device)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-2), reference.rms_norm_reference(x, w, 1e-2))
    assert (kernels.rms_norm(x, w, 1e-2) - kernels.rms_norm(x, w, 1e-8)).abs().max() > 0.1


def test_rms_norm_under_torch_compile(device):  # noqa: ANN001
    x = torch.randn(4, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)
    f = torch.compile(lambda x, w: kernels.rms_norm(x, w, 1e-6).sum(), fullgraph=True,
                      backend="aot_eager" if device.type == "cpu" else "inductor")  # fmt: skip
    f(x, w).backward()
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    reference.rms_norm_reference(x2, w2, 1e-6).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype, device):  # noqa: ANN001
    g = torch.Generator().manual_seed(1)
    gate = (3 * torch.randn(37, 300, generator=g)).to(device, dtype)
    up = torch.randn(37, 300, generator=g).to(device, dtype)
    _compare(kernels.swiglu, reference.swiglu_reference, [gate, up], dtype)


def _rope_tables(t: int, half: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.arange(t, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().to(device), angles.sin().to(device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(dtype, device):  # noqa: ANN001
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 37, 3, 32, generator=g).to(device, dtype)
    k = torch.randn(2, 37, 1, 32, generator=g).to(device, dtype)  # fewer kv heads (GQA)
    cos, sin = _rope_tables(50, 16, device)  # table longer than T: only the first T rows are used

    def fused(q, k):  # noqa: ANN001
        return kernels.apply_rope(q, k, cos, sin)

    def ref(q, k):  # noqa: ANN001
        return reference.apply_rope_reference(q, k, cos, sin)

    _compare(fused, ref, [q, k], dtype)


def test_rope_convention_is_rotate_half(device):  # noqa: ANN001
    """Pin the pairing (i, i + D/2) with an explicit formula, independent of reference.py."""
    q = torch.randn(1, 5, 2, 16, device=device)
    cos, sin = _rope_tables(5, 8, device)
    out, _ = kernels.apply_rope(q, q[:, :, :1], cos, sin)
    x1, x2 = q[..., :8], q[..., 8:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    torch.testing.assert_close(out, torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1), atol=1e-6, rtol=1e-6)
    # Position 0 has angle 0: identity.
    torch.testing.assert_close(out[:, 0], q[:, 0])


def test_swiglu_and_rope_under_torch_compile(device):  # noqa: ANN001
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    gate = torch.randn(6, 40, device=device, requires_grad=True)
    q = torch.randn(1, 6, 2, 16, device=device, requires_grad=True)
    cos, sin = _rope_tables(6, 8, device)

    @torch.compile(backend=backend, fullgraph=True)
    def f(gate, q):  # noqa: ANN001
        qr, kr = kernels.apply_rope(q, q, cos, sin)
        return kernels.swiglu(gate, gate).sum() + (qr * kr).sum()

    f(gate, q).backward()
    g2, q2 = gate.detach().requires_grad_(), q.detach().requires_grad_()
    qr, kr = reference.apply_rope_reference(q2, q2, cos, sin)
    (reference.swiglu_reference(g2, g2).sum() + (qr * kr).sum()).backward()
    torch.testing.assert_close(gate.grad, g2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-5, rtol=1e-5)
