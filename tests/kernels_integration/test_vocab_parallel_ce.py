"""Fused linear + cross-entropy with the head split over the vocabulary (tensor parallel), 2 gloo processes.

Each rank holds half of the [V, D] weight's rows; both get the full hidden states and targets. Checked
against the single-process reference on the full tensors, fp32, atol = rtol = 1e-5 (the same fp32 math in
another order; observed ~1e-7):
- ``kernels.vocab_parallel_linear_cross_entropy`` on plain tensors: loss, the all-reduced hidden gradient and
  each rank's weight-shard gradient; with ignored rows, an in-vocabulary ignore_index, z-loss and several
  chunk sizes; through the Triton kernels (interpreted) and through the plain-torch fallback;
- ``scaletrain.ops.linear_cross_entropy(fused=True)`` on DTensors as the GPT recipe calls it: hidden
  states sequence-sharded [B, T, D] (Shard(1)), weight Shard(0); the hidden gradient comes back through
  DTensor's reduce-scatter;
- memory: no tensor made in forward + backward has more than chunk x V/2 logits (the control, the unfused
  reference, does make the full [N, V] logits, so the check can fail).
The worker is this file run under torchrun; it prints VOCAB-PARALLEL-OK per rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from ki_common import run_interpreted_workers

TOL = dict(atol=1e-5, rtol=1e-5)
B, T, D, V = 3, 11, 16, 48  # N = 33 rows: chunks of 8 leave a ragged last chunk


def _worker() -> None:  # noqa: C901 - one linear script of checks
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(Path(__file__).parent))
    from ki_common import KernelOps

    import scaletrain.kernels.fused_linear_ce as flce
    from scaletrain import kernels, ops
    from scaletrain.kernels.reference import fused_linear_cross_entropy_reference

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    rank, shard = dist.get_rank(), V // 2
    g = torch.Generator().manual_seed(0)  # same full tensors on every rank
    hidden = torch.randn(B * T, D, generator=g)
    weight = 0.3 * torch.randn(V, D, generator=g)
    targets = torch.randint(0, V, (B * T,), generator=g)
    targets[::4] = -100
    failures: list[str] = []

    def reference(targets_N, **kw):  # noqa: ANN001, ANN003, ANN202
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_linear_cross_entropy_reference(h, w, targets_N, **kw)
        loss.backward()
        return loss.detach(), h.grad, w.grad[rank * shard : (rank + 1) * shard]

    def compare(name: str, got, want) -> None:  # noqa: ANN001
        for what, a, b in zip(("loss", "hidden grad", "weight grad"), got, want, strict=True):
            try:
                torch.testing.assert_close(a, b, **TOL)
            except AssertionError as e:
                failures.append(f"{name}: {what}: {e}")

    def plain_case(name: str, chunk_size: int | None, z_loss: float, ignore_index: int, expect_ops: bool) -> None:
        t = targets.clone()
        if ignore_index != -100:
            t[t == -100] = ignore_index  # an ignore value inside the vocabulary (owned by one shard)
        h = hidden.clone().requires_grad_()
        w = weight[rank * shard : (rank + 1) * shard].clone().requires_grad_()
        with KernelOps() as seen:
            loss = kernels.vocab_parallel_linear_cross_entropy(
                h, w, t, mesh.get_group(), vocab_start=rank * shard, ignore_index=ignore_index, z_loss=z_loss,
                chunk_size=chunk_size,
            )  # fmt: skip
            loss.backward()
        want_ops = {"cross_entropy_shard_stats", "cross_entropy_shard_grad_"} if expect_ops else set()
        if want_ops != seen.names & {"cross_entropy_shard_stats", "cross_entropy_shard_grad_"}:
            failures.append(f"{name}: ran {sorted(seen.names)}, expected {sorted(want_ops)}")
        compare(name, (loss.detach(), h.grad, w.grad), reference(t, ignore_index=ignore_index, z_loss=z_loss))

    for chunk in (8, None):
        for z_loss in (0.0, 1e-2):
            plain_case(f"triton chunk={chunk} z={z_loss}", chunk, z_loss, -100, expect_ops=True)
    plain_case("triton ignore_index=5", 8, 0.0, 5, expect_ops=True)
    use_triton = flce.use_triton
    flce.use_triton = lambda *tensors: False  # the plain-torch per-chunk steps (no Triton on the device)
    plain_case("torch fallback z=1e-2", 8, 1e-2, -100, expect_ops=False)
    plain_case("torch fallback ignore_index=30", 8, 0.0, 30, expect_ops=False)
    flce.use_triton = use_triton

    # The recipe's call: sequence-sharded hidden DTensor, vocabulary-sharded weight DTensor.
    h_full = hidden.view(B, T, D)[:, : T - 1].contiguous()  # T - 1 = 10 positions: split evenly over 2
    t_full = targets.view(B, T)[:, : T - 1]
    h_dt = distribute_tensor(h_full, mesh, [Shard(1)]).requires_grad_()
    w_dt = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    loss = ops.linear_cross_entropy(h_dt, w_dt, t_full, fused=True, chunk_size=8)
    loss.backward()
    h_ref, w_ref = h_full.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = fused_linear_cross_entropy_reference(h_ref.flatten(0, 1), w_ref, t_full.flatten())
    ref.backward()
    shard_rows = slice(rank * shard, (rank + 1) * shard)
    got = (loss.detach(), h_dt.grad.full_tensor(), w_dt.grad.to_local())
    compare("ops DTensor", got, (ref.detach(), h_ref.grad, w_ref.grad[shard_rows]))

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        self.largest = max(self.largest, t.numel())
            return out

    h = hidden.clone().requires_grad_()
    w = weight[shard_rows].clone().requires_grad_()
    with Largest() as fused_mode:
        kernels.vocab_parallel_linear_cross_entropy(h, w, targets, mesh.get_group(), vocab_start=rank * shard,
                                                    chunk_size=8).backward()  # fmt: skip
    bound = max(8 * shard, shard * D, B * T * D)
    if not 0 < fused_mode.largest <= bound < B * T * V:
        failures.append(f"memory: largest tensor {fused_mode.largest} > bound {bound}")
    with Largest() as control:
        fused_linear_cross_entropy_reference(hidden.clone().requires_grad_(), weight, targets)
    if control.largest < B * T * V:
        failures.append(f"memory control saw no full logits ({control.largest})")

    if failures:
        print("\n".join(failures), flush=True)
        os._exit(1)
    print("VOCAB-PARALLEL-OK", flush=True)
    dist.barrier()
    os._exit(0)


@pytest.fixture(scope="module")
def worker_output() -> str:
    return run_interpreted_workers(__file__)


def test_vocab_parallel_fused_cross_entropy_matches_the_reference(worker_output):  # noqa: ANN001
    assert worker_output.count("VOCAB-PARALLEL-OK") == 2, worker_output[-5000:]


if __name__ == "__main__":
    _worker()
