"""Checkpointer units on a one-process gloo group: RNG states, async publish, safe loading."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from scaletrain.checkpoint import Checkpointer, CheckpointError
from scaletrain.checkpoint.safe_io import SafeFileSystemReader, SafeLoadPlanner, read_metadata


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


def test_rng_states_are_saved_and_restored(group, tmp_path):
    model, optimizer = _model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=2)
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    folder = ckpt.save(1, model, optimizer, {"step": 1}, layout="single process")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # training moves the generators on
    ckpt.load(folder, model, optimizer)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_async_save_publishes_only_when_finished_and_keeps_the_saved_values(group, tmp_path):
    model, optimizer = _model_and_optimizer()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(tmp_path, keep=2, async_mode="async")
    final = ckpt.save(1, model, optimizer, {"step": 1}, layout="single process")
    assert not final.exists()  # not visible until published
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training continues while the write is in flight
    assert ckpt.finish() == final and (final / "manifest.json").is_file()
    assert not list(tmp_path.glob("*.partial"))
    fresh, fresh_optimizer = _model_and_optimizer(seed=1)
    ckpt.load(final, fresh, fresh_optimizer)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_keep_prunes_old_checkpoints(group, tmp_path):
    model, optimizer = _model_and_optimizer()
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, optimizer, {"step": step}, layout="single process")
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
    folder = Checkpointer(tmp_path, keep=2).save(1, model, optimizer, {"step": 1}, layout="single process")
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
