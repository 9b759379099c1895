"""ShardedLoader: layout-independent global order, resumption across layouts, epochs, workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scaletrain.data import ShardedLoader, TokenWindowDataset, epoch_permutation


class IdDataset:
    """Item i = {"x": [i, 2i]}: lets tests check that payloads match sample_ids."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([i, 2 * i], dtype=torch.int64)}


def make(ds, *, gbs=12, mb=3, rank=0, dp=1, seed=7, workers=0) -> ShardedLoader:
    return ShardedLoader(
        ds, global_batch_size=gbs, micro_batch_size=mb, dp_rank=rank, dp_size=dp, seed=seed, num_workers=workers
    )


def step_ids(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return torch.cat([b["sample_ids"] for b in batches]).tolist()


def run_ids(loader: ShardedLoader, num_steps: int) -> list[list[int]]:
    return [step_ids(loader.next_step()) for _ in range(num_steps)]


def global_run(ds, num_steps: int, *, gbs: int, mb: int, dp: int, seed: int = 7) -> list[list[int]]:
    """Per step, the ranks' sample_ids concatenated in rank order."""
    loaders = [make(ds, gbs=gbs, mb=mb, rank=r, dp=dp, seed=seed) for r in range(dp)]
    return [sum((step_ids(ld.next_step()) for ld in loaders), []) for _ in range(num_steps)]


N = 37  # deliberately not a multiple of any batch size, so steps straddle epochs


@pytest.mark.parametrize(("dp", "mb"), [(1, 3), (1, 1), (2, 6), (2, 2), (4, 3), (4, 1)])
def test_global_order_independent_of_layout(dp, mb):
    ds = IdDataset(N)
    reference = global_run(ds, 10, gbs=12, mb=12, dp=1)
    assert global_run(ds, 10, gbs=12, mb=mb, dp=dp) == reference


@pytest.mark.parametrize(("dp", "mb"), [(1, 12), (2, 3), (4, 1)])
def test_rank_shapes_and_payloads(dp, mb):
    ds = IdDataset(N)
    for rank in range(dp):
        loader = make(ds, gbs=12, mb=mb, rank=rank, dp=dp)
        assert loader.num_micro_batches == 12 // (dp * mb)
        for _ in range(4):
            batches = loader.next_step()
            assert len(batches) == 12 // (dp * mb)
            for b in batches:
                assert b["sample_ids"].dtype == torch.int64 and b["sample_ids"].shape == (mb,)
                assert b["x"].shape == (mb, 2)
                assert torch.equal(b["x"][:, 0], b["sample_ids"])
                assert torch.equal(b["x"][:, 1], 2 * b["sample_ids"])


def test_order_follows_epoch_permutations_and_rolls_over():
    ds = IdDataset(10)
    loader = make(ds, gbs=4, mb=2)
    flat = sum(run_ids(loader, 10), [])  # 40 samples = exactly 4 epochs; steps 2 and 7 straddle
    assert len(flat) == 40
    epochs = [flat[e * 10 : (e + 1) * 10] for e in range(4)]
    for e, ids in enumerate(epochs):
        assert sorted(ids) == list(range(10)), f"epoch {e} skips or repeats a sample"
        assert ids == epoch_permutation(10, 7, e).tolist()
    assert len({tuple(ids) for ids in epochs}) == 4, "epochs should be reshuffled"
    assert loader.epoch == 4 and loader.steps_done == 10


def test_seed_changes_order_and_is_repeatable():
    ds = IdDataset(50)
    a = run_ids(make(ds, gbs=10, mb=5, seed=1), 3)
    assert a == run_ids(make(ds, gbs=10, mb=5, seed=1), 3)
    assert a != run_ids(make(ds, gbs=10, mb=5, seed=2), 3)


def test_state_dict_format():
    loader = make(IdDataset(N), gbs=12, mb=3)
    loader.next_step()
    loader.next_step()
    sd = loader.state_dict()
    assert sd == {"version": 1, "consumed_samples": 24, "seed": 7, "dataset_len": N, "global_batch_size": 12}
    assert json.loads(json.dumps(sd)) == sd  # plain ints: fits any checkpoint format


@pytest.mark.parametrize(
    ("before", "after"),
    [((1, 12), (1, 12)), ((2, 2), (4, 1)), ((4, 3), (1, 6)), ((1, 4), (2, 6)), ((2, 6), (3, 4))],
)
def test_resume_across_layouts_equals_uninterrupted(before, after):
    ds = IdDataset(N)
    total, split = 9, 4
    uninterrupted = global_run(ds, total, gbs=12, mb=12, dp=1)

    dp0, mb0 = before
    first = [make(ds, gbs=12, mb=mb0, rank=r, dp=dp0) for r in range(dp0)]
    got = [sum((step_ids(ld.next_step()) for ld in first), []) for _ in range(split)]
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] for s in states), "the state must be global, identical on every rank"

    dp1, mb1 = after
    second = [make(ds, gbs=12, mb=mb1, rank=r, dp=dp1) for r in range(dp1)]
    for ld in second:
        ld.load_state_dict(json.loads(json.dumps(states[0])))
    got += [sum((step_ids(ld.next_step()) for ld in second), []) for _ in range(total - split)]

    assert got == uninterrupted
    flat = sum(got, [])
    # No gaps, no repeats: every window of N consecutive samples covers the dataset once.
    for e in range(len(flat) // N):
        assert sorted(flat[e * N : (e + 1) * N]) == list(range(N))


def test_resume_with_new_global_batch_size_continues_at_same_sample():
    ds = IdDataset(N)
    reference = sum(run_ids(make(ds, gbs=12, mb=12), 6), [])  # 72 samples
    first = make(ds, gbs=12, mb=4)
    got = sum(run_ids(first, 2), [])
    second = make(ds, gbs=8, mb=4)
    second.load_state_dict(first.state_dict())
    got += sum(run_ids(second, 6), [])
    assert got == reference


def test_workers_give_identical_batches():
    ds = IdDataset(N)
    plain = make(ds, gbs=8, mb=2, rank=1, dp=2)
    workers = make(ds, gbs=8, mb=2, rank=1, dp=2, workers=2)
    try:
        for _ in range(12):  # crosses two epoch boundaries
            a, b = plain.next_step(), workers.next_step()
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                assert x.keys() == y.keys()
                for k in x:
                    assert torch.equal(x[k], y[k]), k
    finally:
        workers.close()


def test_workers_prefetch_does_not_advance_state_and_resume_works():
    ds = IdDataset(N)
    reference = run_ids(make(ds, gbs=8, mb=2), 8)
    loader = make(ds, gbs=8, mb=2, workers=2)
    try:
        got = run_ids(loader, 3)
        # By now the workers have prefetched further ahead; only returned steps count.
        assert loader.state_dict()["consumed_samples"] == 3 * 8
        resumed = make(ds, gbs=8, mb=4, workers=2)
        resumed.load_state_dict(loader.state_dict())
        got += run_ids(resumed, 5)
        resumed.close()
    finally:
        loader.close()
    assert got == reference


def test_load_state_dict_rewinds_a_running_worker_loader():
    ds = IdDataset(N)
    loader = make(ds, gbs=8, mb=2, workers=2)
    try:
        sd = loader.state_dict()
        first = run_ids(loader, 3)
        loader.load_state_dict(sd)
        assert run_ids(loader, 3) == first
    finally:
        loader.close()


def test_token_windows_through_loader():
    tokens = (np.arange(4001) % 257).astype(np.uint16)
    ds = TokenWindowDataset(tokens, 16)
    loader = make(ds, gbs=8, mb=4, rank=0, dp=2)
    (batch,) = loader.next_step()
    assert batch["input"].shape == (4, 16) and batch["target"].shape == (4, 16)
    assert batch["input"].dtype == torch.int64
    for row, sid in zip(batch["input"], batch["sample_ids"].tolist(), strict=True):
        assert torch.equal(row, ds[sid]["input"])


# ----- one test per bad configuration; messages name the field -----------------------------


def test_global_batch_not_divisible_names_field():
    with pytest.raises(ValueError, match=r"global_batch_size=12.*dp_size \* micro_batch_size"):
        make(IdDataset(N), gbs=12, mb=5, dp=1)
    with pytest.raises(ValueError, match="global_batch_size"):
        make(IdDataset(N), gbs=12, mb=2, dp=4)


def test_bad_dp_rank_names_field():
    with pytest.raises(ValueError, match="dp_rank"):
        make(IdDataset(N), gbs=12, mb=3, rank=2, dp=2)


def test_zero_micro_batch_names_field():
    with pytest.raises(ValueError, match="micro_batch_size"):
        make(IdDataset(N), gbs=12, mb=0)


def test_empty_dataset_rejected():
    with pytest.raises(ValueError, match="empty"):
        make(IdDataset(0))


def test_load_state_dataset_len_mismatch():
    sd = make(IdDataset(N)).state_dict()
    with pytest.raises(ValueError, match=f"dataset_len {N}.*{N + 1}"):
        make(IdDataset(N + 1)).load_state_dict(sd)


def test_load_state_seed_mismatch():
    sd = make(IdDataset(N), seed=1).state_dict()
    with pytest.raises(ValueError, match="seed 1.*2"):
        make(IdDataset(N), seed=2).load_state_dict(sd)


def test_load_state_unknown_version():
    sd = make(IdDataset(N)).state_dict() | {"version": 2}
    with pytest.raises(ValueError, match="version 2"):
        make(IdDataset(N)).load_state_dict(sd)
