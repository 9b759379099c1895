"""The LayerNorm kernel's DTensor sharding rule (scaletrain/kernels/sharding.py: layer_norm_fwd / layer_norm_bwd),
2 processes
(gloo): on DTensor inputs it matches the plain-torch reference on the full tensors — output and every input
gradient, fp32, atol = rtol = 1e-5 — and really runs the ``scaletrain_kernels`` ops.

Cases: plain LayerNorm with weight + bias on a sequence shard (sequence parallel; the weight and bias gradients
come back Partial and sum to the full ones), weight only on a batch shard, no affine replicated; adaLN modulate
with x and shift / scale sharded over the batch (their gradients stay Shard(0)) and with x sequence-sharded and
shift / scale replicated (their gradients, sums over the tokens, come back Partial). The worker is this file
run under torchrun.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ki_common import run_interpreted_workers

TOL = dict(atol=1e-5, rtol=1e-5)


def _worker() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    sys.path.insert(0, str(Path(__file__).parent))
    from ki_common import KernelOps

    from scaletrain import kernels
    from scaletrain.kernels import reference

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)  # same full tensors on every rank
    failures: list[str] = []
    ops = {"layer_norm_fwd", "layer_norm_bwd"}

    def check(name: str, fn, ref, full_inputs, placements, grad_placements) -> None:  # noqa: ANN001
        """fn on DTensors vs ref on the full tensors: output, input grads and the grads' placements."""
        plain = [x.clone().requires_grad_() for x in full_inputs]
        want = ref(*plain)
        upstream = torch.randn(want.shape, generator=g)
        want.backward(upstream)
        dts = [distribute_tensor(x, mesh, [p]).detach().requires_grad_() for x, p in
               zip(full_inputs, placements, strict=True)]  # fmt: skip
        with KernelOps() as seen:
            got = fn(*dts)
            got.backward(DTensor.from_local(upstream, mesh, [Replicate()]).redistribute(mesh, got.placements))
        if not ops <= seen.names:
            failures.append(f"{name}: ops {seen.names} lack {ops}")
        try:
            torch.testing.assert_close(got.full_tensor(), want.detach(), **TOL)
        except AssertionError as e:
            failures.append(f"{name}: output: {e}")
        for i, (x, p, gp) in enumerate(zip(dts, plain, grad_placements, strict=True)):
            if gp is not None and tuple(x.grad.placements) != (gp,):
                failures.append(f"{name}: grad of input {i} placed {x.grad.placements}, expected {gp}")
            try:
                torch.testing.assert_close(x.grad.full_tensor(), p.grad, **TOL)
            except AssertionError as e:
                failures.append(f"{name}: grad of input {i}: {e}")

    x = 1 + torch.randn(2, 8, 36, generator=g)  # width 36: not a power of two
    w, b = torch.rand(36, generator=g) + 0.5, torch.randn(36, generator=g)
    R, P = Replicate(), Partial()
    check("layer_norm/seq", lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5),
          lambda x, w, b: reference.layer_norm_reference(x, w, b, 1e-5), [x, w, b], [Shard(1), R, R],
          [Shard(1), P, P])  # fmt: skip
    check("layer_norm/batch-weight-only", lambda x, w: kernels.layer_norm(x, w, None, 1e-5),
          lambda x, w: reference.layer_norm_reference(x, w, None, 1e-5), [x, w], [Shard(0), R],
          [Shard(0), P])  # fmt: skip
    check("layer_norm/replicated-no-affine", lambda x: kernels.layer_norm(x, None, None, 1e-5),
          lambda x: reference.layer_norm_reference(x, None, None, 1e-5), [x], [R], [R])  # fmt: skip
    shift, scale = torch.randn(2, 36, generator=g), 0.5 * torch.randn(2, 36, generator=g)
    mod = lambda x, s, c: kernels.layer_norm_modulate(x, s, c, 1e-6)  # noqa: E731
    mod_ref = lambda x, s, c: reference.layer_norm_modulate_reference(x, s, c, 1e-6)  # noqa: E731
    check("modulate/batch", mod, mod_ref, [x, shift, scale], [Shard(0)] * 3, [Shard(0)] * 3)
    check("modulate/seq", mod, mod_ref, [x, shift, scale], [Shard(1), R, R], [Shard(1), P, P])
    print(f"rank {dist.get_rank()}: " + ("DTENSOR-OK" if not failures else "FAILED\n" + "\n".join(failures)))
    dist.destroy_process_group()
    # Leave without interpreter finalization (gloo's threads can abort the teardown), as scaletrain's workers do.
    sys.stdout.flush()
    os._exit(0)


def test_layer_norm_runs_on_dtensors_and_matches_the_reference() -> None:
    stdout = run_interpreted_workers(__file__)
    assert stdout.count("DTENSOR-OK") == 2, stdout[-5000:]


if __name__ == "__main__":
    _worker()
