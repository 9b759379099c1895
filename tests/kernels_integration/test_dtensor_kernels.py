"""The kernels' DTensor sharding rules (scaletrain/kernels/sharding.py): each op on DTensor inputs, 2 processes (gloo),
matches the plain-torch reference on the full tensors — output and every input gradient, fp32,
atol = rtol = 1e-5 — and really runs the ``scaletrain_kernels`` op.

Cases: RMSNorm on a sequence shard (sequence parallel: the weight gradient comes back Partial and sums
to the full one) and on a replicated input; SwiGLU sharded on either dim; attention (grouped-query) and
RoPE sharded over heads. The worker is this file run under torchrun.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from ki_common import run_interpreted_workers

TOL = dict(atol=1e-5, rtol=1e-5)


def _worker() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    sys.path.insert(0, str(Path(__file__).parent))
    from ki_common import KernelOps

    from scaletrain import kernels
    from scaletrain.kernels import reference

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)  # same full tensors on every rank
    failures: list[str] = []

    def check(name: str, fn, ref, full_inputs, placements, expect_ops: set[str]) -> None:  # noqa: ANN001
        """fn on DTensors (placements per input) vs ref on the full tensors: outputs and input grads."""
        plain = [x.clone().requires_grad_() for x in full_inputs]
        want = ref(*plain)
        want = want if isinstance(want, tuple) else (want,)
        upstream = [torch.randn(w.shape, generator=g) for w in want]
        torch.autograd.backward(list(want), upstream)
        dts = [distribute_tensor(x, mesh, [p]) for x, p in zip(full_inputs, placements, strict=True)]
        dts = [x.detach().requires_grad_() for x in dts]
        with KernelOps() as seen:
            got = fn(*dts)
            got = got if isinstance(got, tuple) else (got,)
            grads = [DTensor.from_local(u, mesh, [Replicate()]).redistribute(mesh, o.placements) for u, o in
                     zip(upstream, got, strict=True)]  # fmt: skip
            torch.autograd.backward(list(got), grads)
        if not expect_ops <= seen.names:
            failures.append(f"{name}: ops {seen.names} lack {expect_ops}")
        for i, (o, w) in enumerate(zip(got, want, strict=True)):
            try:
                torch.testing.assert_close(o.full_tensor(), w.detach(), **TOL)
            except AssertionError as e:
                failures.append(f"{name}: output {i}: {e}")
        for i, (x, p) in enumerate(zip(dts, plain, strict=True)):
            if name.startswith("rms_norm/seq") and i == 1 and not x.grad.placements[0].is_partial():
                failures.append(f"{name}: the weight gradient of a sequence shard must be Partial, got {x.grad}")
            try:
                torch.testing.assert_close(x.grad.full_tensor(), p.grad, **TOL)
            except AssertionError as e:
                failures.append(f"{name}: grad of input {i}: {e}")

    x, w = torch.randn(2, 8, 32, generator=g), torch.rand(32, generator=g) + 0.5
    norm = lambda x, w: kernels.rms_norm(x, w, 1e-5)  # noqa: E731
    norm_ref = lambda x, w: reference.rms_norm_reference(x, w, 1e-5)  # noqa: E731
    check("rms_norm/seq", norm, norm_ref, [x, w], [Shard(1), Replicate()], {"rms_norm_fwd", "rms_norm_bwd"})
    check("rms_norm/replicated", norm, norm_ref, [x, w], [Replicate(), Replicate()], {"rms_norm_fwd"})
    gate, up = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    for d in (0, 1):
        check(f"swiglu/shard{d}", kernels.swiglu, reference.swiglu_reference, [gate, up], [Shard(d)] * 2,
              {"swiglu_fwd", "swiglu_bwd"})  # fmt: skip
    q = torch.randn(2, 4, 19, 16, generator=g)  # 4 query heads over 2 kv heads, 19: odd length
    k, v = torch.randn(2, 2, 19, 16, generator=g), torch.randn(2, 2, 19, 16, generator=g)
    check("attention/heads", lambda q, k, v: kernels.attention(q, k, v, causal=True),
          lambda q, k, v: reference.attention_reference(q, k, v, causal=True)[0], [q, k, v], [Shard(1)] * 3,
          {"attention_fwd", "attention_bwd"})  # fmt: skip
    qr, kr = torch.randn(2, 7, 4, 16, generator=g), torch.randn(2, 7, 2, 16, generator=g)
    ang = torch.rand(7, 8, generator=g)
    cos, sin = (distribute_tensor(t, mesh, [Replicate()]) for t in (ang.cos(), ang.sin()))
    check("rope/heads", lambda q, k: kernels.apply_rope(q, k, cos, sin),
          lambda q, k: reference.apply_rope_reference(q, k, ang.cos(), ang.sin()), [qr, kr], [Shard(2)] * 2,
          {"rope"})  # fmt: skip
    print(f"rank {dist.get_rank()}: " + ("DTENSOR-OK" if not failures else "FAILED\n" + "\n".join(failures)))
    dist.destroy_process_group()
    # Leave without interpreter finalization: gloo's threads can abort the teardown ("terminate called
    # without an active exception") after all the work is done, as scaletrain.train's workers do.
    sys.stdout.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def worker_output() -> str:
    return run_interpreted_workers(__file__)


def test_kernels_run_on_dtensors_and_match_the_reference(worker_output):  # noqa: ANN001
    assert worker_output.count("DTENSOR-OK") == 2, worker_output[-5000:]


if __name__ == "__main__":
    _worker()
