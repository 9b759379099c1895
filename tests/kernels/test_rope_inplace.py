"""In-place RoPE (``kernels.apply_rope_``): the kernel writes over q and k.

Checked against the out-of-place reference: outputs and the gradients that reach the projections' inputs
(q and k are made by a matmul, as in the models, so the in-place write happens on non-leaf tensors).
Tolerances as in test_elementwise.py: fp32 1e-5, bf16 2e-2. Also: the returned tensors are q and k
themselves (same storage, so no new allocation), grouped-query k with fewer heads, a table longer than T,
and the models' entry point ``ops.rope(fused=True)`` takes the in-place path (op ``rope_`` dispatched).
"""

import pytest
import torch
from st_common import KernelOps

from scaletrain import kernels, ops
from scaletrain.kernels import reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _tables(t: int, half: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    angles = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _projected(fn, x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, cos, sin):  # noqa: ANN001, ANN202
    """q, k = x @ w (fresh non-leaf tensors, as the attention projections make), rotated by fn."""
    b, t, _ = x.shape
    q = (x @ wq).view(b, t, 3, 8)
    k = (x @ wk).view(b, t, 1, 8)
    return fn(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_in_place_matches_reference(dtype, device):  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g).to(device, dtype)
    wq = torch.randn(16, 24, generator=g).to(device, dtype)
    wk = torch.randn(16, 8, generator=g).to(device, dtype)
    cos, sin = _tables(11, 4, device)  # longer than T = 7
    ups = [torch.randn(2, 7, h, 8, generator=g).to(device, dtype) for h in (3, 1)]
    grads = []
    for fn in (kernels.apply_rope_, reference.apply_rope_reference):
        leaves = [t.clone().requires_grad_() for t in (x, wq, wk)]
        out = _projected(fn, *leaves, cos, sin)
        torch.autograd.backward(out, ups)
        grads.append((out, [t.grad for t in leaves]))
    (out_a, grads_a), (out_b, grads_b) = grads
    tol = TOL[dtype]
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    for i, (a, b) in enumerate(zip(grads_a, grads_b, strict=True)):
        torch.testing.assert_close(a.float(), b.float(), atol=tol * 4, rtol=tol, msg=f"grad {i}")


def test_writes_over_its_inputs(device):  # noqa: ANN001
    q = torch.randn(1, 5, 2, 8, device=device)
    k = torch.randn(1, 5, 2, 8, device=device)
    cos, sin = _tables(5, 4, device)
    want_q, want_k = reference.apply_rope_reference(q.clone(), k.clone(), cos, sin)
    q_ptr, k_ptr = q.data_ptr(), k.data_ptr()
    out_q, out_k = kernels.apply_rope_(q, k, cos, sin)
    assert out_q.data_ptr() == q_ptr and out_k.data_ptr() == k_ptr
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)  # q itself now holds the rotation
    torch.testing.assert_close(k, want_k, atol=1e-5, rtol=1e-5)


def test_ops_rope_fused_runs_in_place(device):  # noqa: ANN001
    x = torch.randn(2, 6, 16, device=device, requires_grad=True)
    wq = torch.randn(16, 24, device=device)
    wk = torch.randn(16, 8, device=device)
    angles = torch.outer(torch.arange(6.0), torch.ones(4)).to(device)
    cos_te, sin_te = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    with KernelOps() as seen:
        q, k = _projected(lambda q, k, c, s: ops.rope(q, k, c, s, fused=True), x, wq, wk, cos_te, sin_te)
        (q.sum() + k.sum()).backward()
    assert seen.names == {"rope_"}, seen.names  # forward and backward both in place
    want = _projected(lambda q, k, c, s: ops.rope(q, k, c, s, fused=False), x.detach(), wq, wk, cos_te, sin_te)
    torch.testing.assert_close(q, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, want[1], atol=1e-5, rtol=1e-5)


def test_falls_back_where_autograd_forbids_writing(device):  # noqa: ANN001
    # Tensor parallel hands the projections' outputs out through DTensor.to_local, a custom Function: an
    # in-place write to such a view is refused by autograd, so the rotation must happen out of place.
    class AsIs(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001
            return g

    base = torch.randn(1, 4, 2, 8, device=device, requires_grad=True)
    q = AsIs.apply(base * 1.0)
    k = (base * 1.0).view(1, 4, 2, 8)
    cos, sin = _tables(4, 4, device)
    with KernelOps() as seen:
        out_q, out_k = kernels.apply_rope_(q, k, cos, sin)
    assert seen.names == {"rope"}, seen.names
    assert out_q.data_ptr() != q.data_ptr()
    want = reference.apply_rope_reference(base.detach(), base.detach(), cos, sin)
    torch.testing.assert_close(out_q, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k, want[1], atol=1e-5, rtol=1e-5)
