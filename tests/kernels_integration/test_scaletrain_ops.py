"""scaletrain.ops: every implementation equals the plain-torch reference, forward and every input gradient.

CPU runs the Triton kernels in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
Tolerance fp32 atol=rtol=1e-5 (observed <= 1e-6: same math, other summation order). Odd lengths (19) and
grouped-query heads (4 query, 2 kv) exercise the masks. Each fused test also checks that a
``scaletrain_kernels`` op really ran, so a flag that silently took the reference path fails.
"""

from __future__ import annotations

import pytest
import torch
from ki_common import KernelOps

from scaletrain import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 1e-5


@pytest.fixture(autouse=True)
def _triton_runs() -> None:
    if ops.fused_backend(torch.empty(0, device=DEVICE)) == "torch-fallback":
        pytest.skip("the Triton path cannot run here (no triton, or kernels imported before TRITON_INTERPRET=1)")


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(DEVICE)


def _check(fn, ref, inputs, expect_op: str | None, grad: bool = True) -> None:  # noqa: ANN001
    """fn(*inputs) vs ref(*inputs): outputs and (with the same upstream grads) every input's gradient."""
    a = [x.detach().clone().requires_grad_(grad and x.is_floating_point()) for x in inputs]
    b = [x.detach().clone().requires_grad_(grad and x.is_floating_point()) for x in inputs]
    if expect_op is None:
        out_a = fn(*a)
    else:
        with KernelOps() as seen:
            out_a = fn(*a)
        assert any(expect_op in name for name in seen.names), f"no {expect_op} kernel ran (saw {seen.names})"
    out_b = ref(*b)
    out_a = out_a if isinstance(out_a, tuple) else (out_a,)
    out_b = out_b if isinstance(out_b, tuple) else (out_b,)
    for oa, ob in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(oa, ob, atol=TOL, rtol=TOL)
    if not grad:
        return
    g = torch.Generator().manual_seed(11)
    ups = [torch.randn(o.shape, generator=g).to(o) for o in out_b]
    torch.autograd.backward(out_a, ups)
    torch.autograd.backward(out_b, ups)
    for i, (xa, xb) in enumerate(zip(a, b, strict=True)):
        if xb.requires_grad:
            assert xa.grad is not None, f"input {i} got no gradient"
            torch.testing.assert_close(xa.grad, xb.grad, atol=4 * TOL, rtol=TOL, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("impl", ["sdpa", "triton", "flex"])
def test_attention_matches_eager(impl, causal):  # noqa: ANN001
    q, k, v = _randn(2, 4, 19, 16, seed=0), _randn(2, 2, 19, 16, seed=1), _randn(2, 2, 19, 16, seed=2)
    # FlexAttention has no CPU backward: forward only there (ops raises a clear error, tested below).
    grad = not (impl == "flex" and DEVICE.type == "cpu")
    _check(
        lambda q, k, v: ops.attention(q, k, v, causal=causal, impl=impl),
        lambda q, k, v: ops.attention(q, k, v, causal=causal, impl="eager"),
        [q, k, v],
        "attention" if impl == "triton" else None,
        grad=grad,
    )


def test_eager_causal_mask_is_real():
    q, k, v = _randn(1, 2, 8, 16, seed=0), _randn(1, 2, 8, 16, seed=1), _randn(1, 2, 8, 16, seed=2)
    causal = ops.attention(q, k, v, causal=True, impl="eager")
    full = ops.attention(q, k, v, causal=False, impl="eager")
    torch.testing.assert_close(causal[:, :, -1], full[:, :, -1])  # the last query sees every key either way
    assert (causal[:, :, 0] - full[:, :, 0]).abs().max() > 1e-2
    # The first query attends only to key 0: its output is v[0] (per kv head, repeated over the group).
    torch.testing.assert_close(causal[:, :, 0], v[:, :, 0])


def test_unknown_attention_impl_names_the_field():
    q = _randn(1, 2, 4, 16, seed=0)
    with pytest.raises(ValueError, match="model.attention: unknown implementation 'fast'"):
        ops.attention(q, q, q, impl="fast")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="FlexAttention trains on GPUs")
def test_flex_training_on_cpu_is_a_clear_error():
    q = _randn(1, 2, 8, 16, seed=0).requires_grad_()
    with pytest.raises(RuntimeError, match="model.attention: 'flex' cannot train on the CPU"):
        ops.attention(q, q, q, impl="flex")


def test_rms_norm_fused_matches():
    x, w = _randn(2, 19, 48, seed=0), 1 + _randn(48, seed=1, scale=0.1)
    _check(lambda x, w: ops.rms_norm(x, w, 1e-5, fused=True), lambda x, w: ops.rms_norm(x, w, 1e-5), [x, w], "rms")


def test_rope_fused_matches():
    q, k = _randn(2, 19, 4, 16, seed=0), _randn(2, 19, 2, 16, seed=1)
    angles = torch.outer(torch.arange(19.0), 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16))
    angles = torch.cat((angles, angles), dim=-1).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    _check(lambda q, k: ops.rope(q, k, cos, sin, fused=True), lambda q, k: ops.rope(q, k, cos, sin), [q, k], "rope")


def test_swiglu_fused_matches():
    gate, up = _randn(3, 19, 40, seed=0), _randn(3, 19, 40, seed=1)
    _check(lambda g, u: ops.swiglu(g, u, fused=True), lambda g, u: ops.swiglu(g, u), [gate, up], "swiglu")


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_linear_cross_entropy_fused_matches(z_loss):  # noqa: ANN001
    hidden, weight = _randn(37, 32, seed=0), _randn(70, 32, seed=1, scale=0.3)
    targets = torch.randint(0, 70, (37,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    targets[::5] = -100  # ignored rows
    _check(
        lambda h, w, t: ops.linear_cross_entropy(h, w, t, fused=True, z_loss=z_loss, chunk_size=16),
        lambda h, w, t: ops.linear_cross_entropy(h, w, t, z_loss=z_loss),
        [hidden, weight, targets],
        "cross_entropy",
    )


def test_unfused_linear_cross_entropy_is_torch_cross_entropy():
    hidden, weight = _randn(9, 8, seed=0), _randn(11, 8, seed=1)
    targets = torch.arange(9, device=DEVICE)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(ops.linear_cross_entropy(hidden, weight, targets), expected)
