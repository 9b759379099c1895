"""The global-batch contrastive loss, checked at the level of the loss itself (2 and 4 gloo ranks).

Each rank holds its B rows of a global batch of N image and caption embeddings. The trainer's loss is the mean
over ranks of `contrastive_loss(rows, group)` and data parallel averages gradients over ranks, so rank r's
share of the gradient is grad(rank r's loss) / W, summed over every rank's loss by GatherRows' backward. Both
must equal one process's loss over all N rows and its gradient on rows r (fp32, 1e-6 relative; observed ~1e-8).

The two classic bugs run through the same check and must fail it, by at least the stated margins:
- the all-gather without gradient (gather into buffers, this rank's rows put back so they keep theirs, as in
  open_clip's gather_with_grad=False): the loss is right but the gradient misses every other rank's use of
  these rows (the larger of the two embedding gradients observed 0.19-0.35 relative off at W=2, 0.22-0.28
  at W=4; must be > 0.1);
- the loss over the local batch only: the loss itself is off (observed 0.29 relative at W=2, 0.41 at W=4;
  must be > 0.05).
Mutation of the real code seen failing: GatherRows' backward without its all-reduce.
The worker is this file run under torchrun; it prints CLIP-GATHER-OK per rank.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

B, E = 3, 8
RTOL = 1e-6


def _worker() -> None:
    import torch
    import torch.distributed as dist

    from scaletrain.recipes.clip.model import contrastive_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    g = torch.Generator().manual_seed(0)  # the same global batch on every rank
    image_NE, text_NE = torch.randn(2, world * B, E, generator=g)
    logit_scale = torch.tensor([2.0])
    mine = slice(rank * B, (rank + 1) * B)

    def one_process() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image, text, t = image_NE.clone().requires_grad_(), text_NE.clone().requires_grad_(), logit_scale.clone()
        t.requires_grad_()
        loss = contrastive_loss(image, text, t, None)
        loss.backward()
        return loss.detach(), image.grad[mine], text.grad[mine], t.grad

    def distributed(loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
        image, text = image_NE[mine].clone().requires_grad_(), text_NE[mine].clone().requires_grad_()
        t = logit_scale.clone().requires_grad_()
        loss = loss_fn(image, text, t)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        t_grad = t.grad.clone()
        dist.all_reduce(t_grad)  # data parallel's gradient average over ranks
        return mean_loss / world, image.grad / world, text.grad / world, t_grad / world

    def no_grad_gather(x_BE: torch.Tensor) -> torch.Tensor:
        rows = [torch.empty_like(x_BE) for _ in range(world)]
        dist.all_gather(rows, x_BE.detach().contiguous(), group=group)
        rows[rank] = x_BE  # this rank's rows keep their gradient, the others' do not
        return torch.cat(rows)

    def mutated_gather_loss(image_BE, text_BE, t):  # noqa: ANN001, ANN202
        import scaletrain.recipes.clip.model as clip_model

        real = clip_model.GatherRows.apply
        clip_model.GatherRows.apply = lambda x, _group: no_grad_gather(x)
        try:
            return contrastive_loss(image_BE, text_BE, t, group)
        finally:
            clip_model.GatherRows.apply = real

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    want = one_process()
    real = distributed(lambda i, t_, s: contrastive_loss(i, t_, s, group))
    no_grad = distributed(mutated_gather_loss)
    local = distributed(lambda i, t_, s: contrastive_loss(i, t_, s, None))
    names = ("loss", "image grad", "text grad", "temperature grad")
    failures = [f"{n}: {rel(a, b):.2e}" for n, a, b in zip(names, real, want, strict=True) if rel(a, b) > RTOL]
    if rel(no_grad[0], want[0]) > RTOL:
        failures.append("the no-grad gather changed the loss; it should only lose gradient")
    if max(rel(no_grad[1], want[1]), rel(no_grad[2], want[2])) < 0.1:
        failures.append("the no-grad gather's embedding gradients pass the check")
    if rel(local[0], want[0]) < 0.05:
        failures.append("the local-batch loss passes the check")
    assert not failures, failures
    print(f"CLIP-GATHER-OK rank {rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_global_batch_loss_and_gradients_match_one_process_and_the_classic_bugs_do_not(world):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("CLIP-GATHER-OK") == world, done.stdout


if __name__ == "__main__":
    _worker()
