"""Checkpointer units on a one-process gloo group: RNG states, async publish, safe loading."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from scaletrain.checkpoint import Checkpointer, CheckpointError, ModuleState
from scaletrain.checkpoint.safe_io import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from scaletrain.checkpoint.store import resume_seed, seed_rng


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _draws() -> tuple[list[float], float, float]:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_rng_states_are_saved_and_restored(group, tmp_path):
    model, optimizer = _model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=2)
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    folder = ckpt.save(1, ModuleState(model, optimizer), {"step": 1}, layout="single process")
    expected = _draws()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # training moves the generators on
    _, notes = ckpt.load(folder, ModuleState(model, optimizer), rng_seed=0)
    assert _draws() == expected and notes == []


def test_loading_weights_only_leaves_the_rng_alone(group, tmp_path):
    """checkpoint.load_path, sampling and export load weights: the run's own seeding stands."""
    model, optimizer = _model_and_optimizer()
    folder = Checkpointer(tmp_path, keep=2).save(1, ModuleState(model, optimizer), {"step": 1}, layout="single process")
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    expected = _draws()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    Checkpointer(tmp_path, keep=2).load(folder, ModuleState(model))
    assert _draws() == expected


def test_rng_is_reseeded_from_seed_and_step_when_the_world_size_changed(group, tmp_path):
    model, optimizer = _model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=2)
    folder = ckpt.save(7, ModuleState(model, optimizer), {"step": 7}, layout="fsdp")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["world_size"] = 4  # as if saved on 4 ranks; this process is a world of 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    _, notes = ckpt.load(folder, ModuleState(model, optimizer), rng_seed=5)
    got = _draws()
    assert notes == [
        "RNG states not restored (saved on 4 ranks, now 1): every rank's torch/CUDA/Python/NumPy generators "
        "re-seeded from (job.seed 5, step 7)"
    ]
    seed_rng(resume_seed(5, 7))
    assert _draws() == got
    # A function of (seed, step) only: reproducible, a new stream per step, not a fresh run's replay.
    assert resume_seed(5, 7) == resume_seed(5, 7)
    assert len({resume_seed(5, 7), resume_seed(5, 8), resume_seed(6, 7)}) == 3
    torch.manual_seed(5)
    assert torch.rand(3).tolist() != got[0]


def test_async_save_publishes_only_when_finished_and_keeps_the_saved_values(group, tmp_path):
    model, optimizer = _model_and_optimizer()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(tmp_path, keep=2, async_mode="async")
    final = ckpt.save(1, ModuleState(model, optimizer), {"step": 1}, layout="single process")
    assert not final.exists()  # not visible until published
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training continues while the write is in flight
    assert ckpt.finish() == final and (final / "manifest.json").is_file()
    assert not list(tmp_path.glob("*.partial"))
    fresh, fresh_optimizer = _model_and_optimizer(seed=1)
    ckpt.load(final, ModuleState(fresh, fresh_optimizer))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_keep_prunes_old_checkpoints(group, tmp_path):
    model, optimizer = _model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, ModuleState(model, optimizer), {"step": step}, layout="single process")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_metadata_with_a_code_payload_is_refused(group, tmp_path):
    import pickle

    model, optimizer = _model_and_optimizer()
    folder = Checkpointer(tmp_path, keep=2).save(1, ModuleState(model, optimizer), {"step": 1}, layout="single process")
    proof = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(str(proof))))
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_metadata(folder)
    assert not proof.exists()


def test_non_tensor_value_with_a_code_payload_is_refused(group, tmp_path):
    proof = tmp_path / "pwned"
    dcp.save({"w": torch.ones(2), "obj": _Payload(str(proof))}, checkpoint_id=str(tmp_path / "c"))
    target = {"w": torch.empty(2), "obj": None}
    # DCP wraps it in its CheckpointException (a BaseException); load_checkpoint turns that into ours.
    with pytest.raises(BaseException, match="not plain data"):
        dcp.load(target, storage_reader=SafeFileSystemReader(str(tmp_path / "c")), planner=SafeLoadPlanner())
    assert not proof.exists()
    # Control: DCP's default planner runs the payload, which is what the safe planner prevents.
    dcp.load({"w": torch.empty(2), "obj": None}, checkpoint_id=str(tmp_path / "c"))
    assert proof.exists()
