"""Fused linear + cross-entropy vs the unfused reference, and proof that [N, V] logits are never allocated.

Tolerances: fp32 loss and grads atol=rtol=1e-5 (observed ~1e-7). bf16 atol=rtol=2e-2: the chunk logits and
their in-place gradients are bf16 (as in any bf16 LM head), the reference keeps fp32 logits.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scaletrain import kernels
from scaletrain.kernels.reference import fused_linear_cross_entropy_reference

N, D, V = 61, 32, 100


def _data(device, dtype=torch.float32, ignore_every=5, seed=0):  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(device, dtype)
    weight = (0.3 * torch.randn(V, D, generator=g)).to(device, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets, grad_scale=1.0, **kw):  # noqa: ANN001
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    loss.backward(torch.tensor(grad_scale, device=loss.device))
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("z_loss", [0.0, 1e-2], ids=["ce", "z_loss"])
@pytest.mark.parametrize("chunk_size", [16, 61, None], ids=["chunk16", "unchunked", "auto"])
def test_matches_reference(z_loss, chunk_size, device):  # noqa: ANN001
    data = _data(device)
    got = _loss_and_grads(kernels.fused_linear_cross_entropy, *data, grad_scale=2.0, z_loss=z_loss,
                          chunk_size=chunk_size)  # fmt: skip
    want = _loss_and_grads(fused_linear_cross_entropy_reference, *data, grad_scale=2.0, z_loss=z_loss)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_chunked_equals_unchunked_and_z_loss_changes_result(device):  # noqa: ANN001
    data = _data(device, seed=3)
    fused = kernels.fused_linear_cross_entropy
    chunked = _loss_and_grads(fused, *data, z_loss=1e-2, chunk_size=7)
    whole = _loss_and_grads(fused, *data, z_loss=1e-2, chunk_size=N)
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert (_loss_and_grads(fused, *data, z_loss=0.0, chunk_size=7)[0] - chunked[0]).abs() > 1e-3


def test_ignore_index(device):  # noqa: ANN001
    hidden, weight, targets = _data(device, ignore_every=0)
    targets[10:30] = 7  # custom ignore value
    got = _loss_and_grads(kernels.fused_linear_cross_entropy, hidden, weight, targets, ignore_index=7, chunk_size=16)
    keep = targets != 7
    want = _loss_and_grads(fused_linear_cross_entropy_reference, hidden[keep], weight, targets[keep])
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert (got[1][~keep] == 0).all(), "ignored rows must get zero hidden gradient"
    torch.testing.assert_close(got[1][keep], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)


def test_all_rows_ignored_gives_zero(device):  # noqa: ANN001
    hidden, weight, targets = _data(device)
    targets.fill_(-100)
    loss, dh, dw = _loss_and_grads(kernels.fused_linear_cross_entropy, hidden, weight, targets, chunk_size=16)
    assert loss.item() == 0.0 and (dh == 0).all() and (dw == 0).all()


def test_bf16(device):  # noqa: ANN001
    data = _data(device, dtype=torch.bfloat16)
    got = _loss_and_grads(kernels.fused_linear_cross_entropy, *data, z_loss=1e-3, chunk_size=16)
    want = _loss_and_grads(fused_linear_cross_entropy_reference, *data, z_loss=1e-3)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_no_grad_forward_matches(device):  # noqa: ANN001
    data = _data(device)
    with torch.no_grad():
        loss = kernels.fused_linear_cross_entropy(*data, chunk_size=16)
    torch.testing.assert_close(loss, fused_linear_cross_entropy_reference(*data), atol=1e-5, rtol=1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor produced by any dispatched op (every allocation made through torch),
    and the row count of every 2-d tensor with V columns (a logits-shaped tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.logits_rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views (e.g. weight.T) allocate nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.dim() == 2 and t.shape[1] == V:
                    self.logits_rows.append(t.shape[0])
        return out


def test_never_materializes_full_logits(device):  # noqa: ANN001
    """No tensor created in forward + backward has more than chunk rows of logits, and none is as large as
    N x V. The unavoidable outputs are the [V, D] weight grad and the [N, D] hidden grad; N > D > chunk here
    so those are smaller than N x V. The control run shows the mode does see a full [N, V] logits tensor
    when one is created, so this test can fail.
    """
    hidden, weight, targets = _data(device)
    chunk = 16
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _LargestAllocation() as fused_mode:
        kernels.fused_linear_cross_entropy(h, w, targets, chunk_size=chunk).backward()
    assert fused_mode.logits_rows and max(fused_mode.logits_rows) <= chunk, fused_mode.logits_rows
    assert 0 < fused_mode.largest <= max(chunk * V, V * D, N * D) < N * V, fused_mode.largest

    with _LargestAllocation() as control:
        fused_linear_cross_entropy_reference(h, w, targets).backward()
    assert control.largest >= N * V and max(control.logits_rows) == N


def test_under_torch_compile(device):  # noqa: ANN001
    hidden, weight, targets = _data(device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    backend = "aot_eager" if device.type == "cpu" else "inductor"
    f = torch.compile(lambda h, w: kernels.fused_linear_cross_entropy(h, w, targets, z_loss=1e-3, chunk_size=32),
                      backend=backend)  # fmt: skip
    f(h, w).backward()
    want = _loss_and_grads(fused_linear_cross_entropy_reference, hidden, weight, targets, z_loss=1e-3)
    torch.testing.assert_close(h.grad, want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, want[2], atol=1e-5, rtol=1e-5)
