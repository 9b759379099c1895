"""The core's data loader: one global sample order, sliced per data-parallel rank, resumable.

Order. Epoch e is `torch.randperm(N)` from a generator seeded by hashing (seed, e); global
sample number k is position k % N of epoch k // N. Nothing in that depends on the layout, so
any dp_size / micro-batch split of the same run sees the same samples in the same steps.

Sharding. Optimizer step s consumes global samples [s*G, (s+1)*G). Rank r of D takes the
contiguous slice [r*G/D, (r+1)*G/D) of it, cut into G / (D*mb) micro-batches of mb samples.

State. The only progress is `consumed_samples` (global, counted when `next_step` returns,
never when a worker prefetches), so a checkpoint taken with one layout resumes in another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

STATE_VERSION = 1

Batch = dict[str, torch.Tensor]


def stack_dict_batch(items: list[dict[str, torch.Tensor]]) -> Batch:
    """Default collate: stack each key of a list of same-keyed dicts of equal-shape tensors."""
    if not items:
        raise ValueError("stack_dict_batch: empty list of items")
    keys = items[0].keys()
    for it in items[1:]:
        if it.keys() != keys:
            raise ValueError(f"stack_dict_batch: items have different keys: {sorted(keys)} vs {sorted(it.keys())}")
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in keys}


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch); hashed so (s, e) pairs never collide the way
    `seed * C + epoch` would."""
    digest = hashlib.sha256(f"scaletrain.loader/{int(seed)}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The int64 sample order of one epoch."""
    g = torch.Generator(device="cpu")
    g.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=g, dtype=torch.int64)


class _IndexedDataset(Dataset):
    """Yields (index, item) so the collate can attach `sample_ids` inside worker processes."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return int(i), self.dataset[i]


class _CollateWithIds:
    """Module-level (picklable) collate: user collate of the items + a `sample_ids` tensor."""

    def __init__(self, collate: Callable[[list[Any]], Batch]) -> None:
        self.collate = collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> Batch:
        batch = dict(self.collate([item for _, item in pairs]))
        batch["sample_ids"] = torch.tensor([i for i, _ in pairs], dtype=torch.int64)
        return batch


class _RankSchedule:
    """Which dataset indices one rank reads for the step that starts at a global sample number.

    Holds no progress, only the layout and a one-epoch permutation cache, so the loader and
    its worker-mode sampler each own one without sharing state.
    """

    def __init__(self, num_samples: int, seed: int, rank_batch_size: int, dp_rank: int, micro_batch_size: int):
        self.num_samples = num_samples
        self.seed = seed
        self.rank_batch_size = rank_batch_size
        self.dp_rank = dp_rank
        self.micro_batch_size = micro_batch_size
        # A step spans at most a few epochs and steps move forward, so one cached epoch suffices.
        self._perm_epoch = -1
        self._perm = torch.zeros(0, dtype=torch.int64)

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.num_samples, self.seed, epoch)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of global sample numbers [start, start + count), in order."""
        parts = []
        k, end = start, start + count
        while k < end:
            epoch, pos = divmod(k, self.num_samples)
            take = min(end - k, self.num_samples - pos)
            parts.append(self._epoch_perm(epoch)[pos : pos + take])
            k += take
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def micro_batches(self, consumed: int) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) for the step starting at `consumed`."""
        start = consumed + self.dp_rank * self.rank_batch_size
        ids = self.global_indices(start, self.rank_batch_size).tolist()
        mb = self.micro_batch_size
        return [ids[i : i + mb] for i in range(0, len(ids), mb)]


class _MicroBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of dataset indices for one rank, from a given consumed_samples.

    Iterated in the main process by DataLoader (which may run ahead to prefetch); it has its
    own cursor and schedule, so running ahead never touches the loader's `consumed_samples`.
    """

    def __init__(self, schedule: _RankSchedule, global_batch_size: int, start_consumed: int) -> None:
        self.schedule = schedule
        self.global_batch_size = global_batch_size
        self.start_consumed = start_consumed

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.start_consumed
        while True:
            yield from self.schedule.micro_batches(consumed)
            consumed += self.global_batch_size


class ShardedLoader:
    """Deterministic, dp-sharded, resumable loader over a map-style dataset of dict items.

    Each `next_step()` returns this rank's micro-batches for the next optimizer step; every
    batch dict also carries `sample_ids` (int64 dataset indices). See the module docstring.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_workers: int = 0,
        collate: Callable[[list[Any]], Batch] = stack_dict_batch,
    ) -> None:
        num_samples = len(dataset)
        if num_samples < 1:
            raise ValueError("ShardedLoader: dataset is empty")
        for name, value in (
            ("global_batch_size", global_batch_size),
            ("micro_batch_size", micro_batch_size),
            ("dp_size", dp_size),
        ):
            if int(value) < 1:
                raise ValueError(f"ShardedLoader: {name} must be >= 1, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"ShardedLoader: dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        if global_batch_size % (dp_size * micro_batch_size) != 0:
            raise ValueError(
                f"ShardedLoader: global_batch_size={global_batch_size} must be divisible by "
                f"dp_size * micro_batch_size = {dp_size} * {micro_batch_size}"
            )
        if num_workers < 0:
            raise ValueError(f"ShardedLoader: num_workers must be >= 0, got {num_workers}")

        self.dataset = dataset
        self.num_samples = num_samples
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.collate = collate
        self.rank_batch_size = self.global_batch_size // self.dp_size
        self.num_micro_batches = self.rank_batch_size // self.micro_batch_size

        self._consumed_samples = 0
        self._schedule = self._new_schedule()
        self._worker_iter: Iterator[Batch] | None = None

    def _new_schedule(self) -> _RankSchedule:
        return _RankSchedule(self.num_samples, self.seed, self.rank_batch_size, self.dp_rank, self.micro_batch_size)

    def global_indices(self, start: int, count: int) -> torch.Tensor:
        """Dataset indices of global sample numbers [start, start + count), in order."""
        return self._schedule.global_indices(start, count)

    # ----- iteration -----------------------------------------------------------------------

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step (num_micro_batches of them)."""
        if self.num_workers == 0:
            batches = [self._collate_indices(ids) for ids in self._schedule.micro_batches(self._consumed_samples)]
        else:
            if self._worker_iter is None:
                self._worker_iter = self._start_workers()
            batches = [next(self._worker_iter) for _ in range(self.num_micro_batches)]
        # Counted only now: prefetched-but-unreturned batches are not consumed.
        self._consumed_samples += self.global_batch_size
        return batches

    def __iter__(self) -> Iterator[list[Batch]]:
        """Endless steps; the loop owner decides when to stop."""
        while True:
            yield self.next_step()

    def _collate_indices(self, ids: list[int]) -> Batch:
        return _CollateWithIds(self.collate)([(i, self.dataset[i]) for i in ids])

    def _start_workers(self) -> Iterator[Batch]:
        loader = DataLoader(
            _IndexedDataset(self.dataset),
            batch_sampler=_MicroBatchSampler(self._new_schedule(), self.global_batch_size, self._consumed_samples),
            num_workers=self.num_workers,
            collate_fn=_CollateWithIds(self.collate),
            # Results come back in sampler order regardless of which worker finishes first.
            in_order=True,
        )
        return iter(loader)

    def close(self) -> None:
        """Stop worker processes (they restart lazily on the next `next_step`)."""
        self._worker_iter = None  # dropping the DataLoader iterator shuts its workers down

    # ----- state ---------------------------------------------------------------------------

    @property
    def consumed_samples(self) -> int:
        return self._consumed_samples

    @property
    def steps_done(self) -> int:
        return self._consumed_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be consumed."""
        return self._consumed_samples // self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {
            "version": STATE_VERSION,
            "consumed_samples": self._consumed_samples,
            "seed": self.seed,
            "dataset_len": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from `state_dict()` of any layout (dp_size, micro_batch_size, num_workers).

        The seed and dataset length must match (otherwise the order would silently differ).
        A different global_batch_size is allowed: consumption continues at the same global
        sample number, only step boundaries move.
        """
        version = sd.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"loader state: unknown version {version!r} (this code reads version {STATE_VERSION})")
        missing = [k for k in ("consumed_samples", "seed", "dataset_len") if k not in sd]
        if missing:
            raise ValueError(f"loader state: missing field(s) {missing}")
        if int(sd["dataset_len"]) != self.num_samples:
            raise ValueError(
                f"loader state: dataset_len {sd['dataset_len']} in the checkpoint != {self.num_samples} now; "
                "the data changed since the checkpoint"
            )
        if int(sd["seed"]) != self.seed:
            raise ValueError(f"loader state: seed {sd['seed']} in the checkpoint != {self.seed} now")
        consumed = int(sd["consumed_samples"])
        if consumed < 0:
            raise ValueError(f"loader state: consumed_samples must be >= 0, got {consumed}")
        self._consumed_samples = consumed
        self.close()  # any prefetched batches belong to the old position
