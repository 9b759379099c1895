"""Bad checkpoints and folders: each fails with a clear error naming the file (one test per case).

Runs in-process on one rank (a one-process gloo group, like `scaletrain train` without
torchrun). A 4-step run with a checkpoint every 2 steps is made once; each test copies it
and damages the copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from ckpt_harness import TINY

from scaletrain.checkpoint import CheckpointError
from scaletrain.config import load_config
from scaletrain.train import run

SMALL = [
    "--model.n_layers", "2",
    "--data.seq_len", "64",
    "--train.global_batch_size", "4",
    "--train.steps", "4",
    "--train.warmup_steps", "1",
    "--checkpoint.interval", "2",
    "--checkpoint.keep", "3",
    "--metrics.tensorboard", "false",
    "--metrics.console", "false",
]  # fmt: skip


def _run(run_dir: Path, *overrides: str, name: str = "run") -> list[dict]:
    return run(load_config(TINY, [*SMALL, *overrides, "--job.run_dir", str(run_dir), "--job.name", name]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("saved")
    history = _run(root)
    return root, history


@pytest.fixture
def run_dir(saved, tmp_path) -> Path:
    shutil.copytree(saved[0] / "run", tmp_path / "run")
    return tmp_path


def _newest(run_dir: Path) -> Path:
    return run_dir / "run" / "checkpoints" / "step-00000004"


def _a_shard(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_truncated_shard_is_named(run_dir):
    shard = _a_shard(_newest(run_dir))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="truncated") as err:
        _run(run_dir)
    assert str(shard) in str(err.value) and "checkpoint.fallback" in str(err.value)


def test_corrupted_shard_same_size_is_caught_by_checksum(run_dir):
    shard = _a_shard(_newest(run_dir))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as err:
        _run(run_dir)
    assert str(shard) in str(err.value)


def test_missing_manifest_is_named(run_dir):
    manifest = _newest(run_dir) / "manifest.json"
    manifest.unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        _run(run_dir)
    assert str(manifest) in str(err.value)


def test_export_of_a_garbage_manifest_is_one_line(run_dir, tmp_path, capsys):
    from scaletrain import cli

    manifest = _newest(run_dir) / "manifest.json"
    manifest.write_text("{not json")
    code = cli.main(["export", str(_newest(run_dir)), "--format", "safetensors", "--out", str(tmp_path / "w.st")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("scaletrain export: error: ") and err.count("\n") == 1, err
    assert str(manifest) in err and "Traceback" not in err


def test_different_model_shape_names_keys_before_reading_tensors(run_dir, monkeypatch):
    def no_read(*args, **kwargs):
        raise AssertionError("dcp.load was called before the shape check")

    monkeypatch.setattr(dcp, "load", no_read)
    with pytest.raises(CheckpointError) as err:
        _run(run_dir, "--model.dim", "64", "--model.n_layers", "3")
    text = str(err.value)
    assert ".metadata" in text
    assert "model.tok_embeddings.weight: checkpoint [264, 128] vs model [264, 64]" in text
    assert "model.layers.2.attention.wq.weight" in text  # the extra layer is missing in the checkpoint
    assert "--job.name NAME" in text and "--checkpoint.resume false" in text  # how to start a new run instead


def test_resuming_a_finished_run_says_there_is_nothing_to_train(run_dir, capsys):
    history = _run(run_dir, "--train.steps", "2", "--metrics.console", "true")
    assert history == []
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-00000004 (step 4)" in out
    assert "nothing to train: step 4 >= train.steps 2" in out and "--job.name NAME" in out


def test_incompatible_format_version_is_named(run_dir):
    manifest = _newest(run_dir) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="format version 99 is not supported") as err:
        _run(run_dir)
    assert str(manifest) in str(err.value)


def test_empty_checkpoint_dir_as_load_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty") as err:
        _run(tmp_path, "--checkpoint.load_path", str(empty), name="fresh")
    assert str(empty) in str(err.value)


@pytest.fixture
def read_only_dir(tmp_path):
    """The run's checkpoint folder, read-only: chmod for normal users; a read-only tmpfs for root."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_checkpoint_dir_fails_before_training(read_only_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not writable") as err:
        _run(tmp_path, name="run")
    assert str(read_only_dir) in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").read_text().strip()  # no step was trained


def test_fallback_skips_a_damaged_newest_checkpoint(run_dir, saved, capsys):
    shard = _a_shard(_newest(run_dir))
    shard.write_bytes(b"")
    history = _run(run_dir, "--checkpoint.fallback", "true", "--metrics.console", "true")
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and str(shard) in out
    assert "step-00000002" in out
    # Resumed from step 2 and re-did steps 3-4 exactly as the original run did.
    assert [h["step"] for h in history] == [3, 4]
    assert [h["loss"] for h in history] == [h["loss"] for h in saved[1][2:]]
