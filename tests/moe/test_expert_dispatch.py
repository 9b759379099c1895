"""Expert-parallel dispatch and combine (scaletrain/parallel/expert_parallel.py), 3 gloo processes.

6 experts over ep=3 (2 per rank). Each rank sends an uneven set of rows, sorted by expert: some experts get
no rows from some ranks, experts 4 and 5 get none at all, so rank 2 receives nothing. Each rank then runs its
experts (a grouped GEMM with its slice of a [6, D, D] stack) on what it received and combines. Checked
against every rank computing its own rows with the whole stack: the outputs and the rows' gradients are
equal, and each rank's expert-weight gradient equals the single-process gradient summed over all ranks' rows
(fp32, 1e-6 relative). The worker is this file run under torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

E, EP, D = 6, 3, 8
# Rows per expert, by sending rank. Later ranks send to lower experts than earlier ones, so what arrives
# (source-major) must be reordered expert-major.
COUNTS = {0: [0, 3, 1, 2, 0, 0], 1: [0, 2, 0, 1, 0, 0], 2: [1, 1, 2, 3, 0, 0]}


def _worker() -> None:
    import torch.distributed as dist

    from scaletrain.parallel.expert_parallel import combine, dispatch
    from scaletrain.recipes.gpt.moe import grouped_mm

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.new_group(list(range(EP)))
    weights = torch.randn(E, D, D, generator=torch.Generator().manual_seed(0))  # the same stack on every rank
    counts_E = torch.tensor(COUNTS[rank])
    g = torch.Generator().manual_seed(100 + rank)
    x_PD = torch.randn(int(counts_E.sum()), D, generator=g)
    probe_PD = torch.randn(int(counts_E.sum()), D, generator=g)  # a loss that weighs every output differently

    # Reference: this rank's rows through the whole stack.
    x_ref, w_ref = x_PD.clone().requires_grad_(), weights.clone().requires_grad_()
    y_ref = grouped_mm(x_ref, w_ref, counts_E)
    (y_ref * probe_PD).sum().backward()
    dist.all_reduce(w_ref.grad)  # every rank's rows' contribution

    # Expert parallel: this rank holds experts [2 * rank, 2 * rank + 2).
    local = slice(rank * E // EP, (rank + 1) * E // EP)
    x_ep, w_ep = x_PD.clone().requires_grad_(), weights[local].clone().requires_grad_()
    x_QD, local_counts, route = dispatch(x_ep, counts_E, group)
    expected_counts = [sum(COUNTS[r][e] for r in range(EP)) for e in range(E)][local]
    assert local_counts.tolist() == expected_counts, (rank, local_counts.tolist(), expected_counts)
    assert x_QD.shape[0] == sum(expected_counts)
    y_ep = combine(grouped_mm(x_QD, w_ep, local_counts), route)
    (y_ep * probe_PD).sum().backward()

    torch.testing.assert_close(y_ep, y_ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w_ep.grad, w_ref.grad[local], rtol=1e-6, atol=1e-6)
    if rank == 2:
        assert x_QD.shape[0] == 0 and bool((w_ep.grad == 0).all())  # nothing arrived, nothing to learn
    print(f"DISPATCH-OK rank {rank} received {x_QD.shape[0]} rows", flush=True)
    dist.destroy_process_group()


def test_uneven_dispatch_and_combine_match_local_experts():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={EP}", __file__]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert done.stdout.count("DISPATCH-OK") == EP, done.stdout
    assert "rank 2 received 0 rows" in done.stdout


if __name__ == "__main__":
    _worker()
