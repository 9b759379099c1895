"""Sharded checkpoints with torch.distributed.checkpoint, published atomically.

Layout of a run folder:
  checkpoints/step-00000100/            a complete checkpoint (DCP shards + trainer.json + manifest.json)
  checkpoints/step-00000200.partial/    a save in progress or killed mid-way: never loaded

Each rank writes its own shards into the `.partial` folder; after a barrier, rank 0 writes
the manifest (files and sizes) and renames the folder, which is atomic on POSIX. So a crash
during a save leaves the previous checkpoint untouched, and the loader only ever sees
complete ones. Model and optimizer state go through DCP's state-dict API, which stores
full (unsharded) tensor names and shapes — any layout can load what any other saved.
Loading uses DCP's non-pickle format; trainer.json is plain JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / "manifest.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _manifest(folder: Path, step: int, extra: dict[str, Any]) -> dict[str, Any]:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    return {"format_version": FORMAT_VERSION, "step": step, "files": files, **extra}


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: Any,
    trainer_state: dict[str, Any],
    *,
    layout: str,
    keep: int,
    extra_tensors: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the published folder.

    `extra_tensors` holds further named tensor dicts saved beside the model (e.g. "ema").
    """
    rank = dist.get_rank()
    final = _step_dir(root, step)
    partial = final.with_name(final.name + ".partial")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    dist.barrier()
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
        **(extra_tensors or {}),
    }
    dcp.save(state, checkpoint_id=str(partial))
    if rank == 0:
        (partial / "trainer.json").write_text(json.dumps(trainer_state))
        manifest = _manifest(partial, step, {"layout": layout, "world_size": dist.get_world_size()})
        tmp = partial / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, partial / "manifest.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: Any | None, extra_tensors: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Load model (and optimizer, and `extra_tensors` in place) from `folder`; returns the trainer state."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no manifest.json — not a complete scaletrain checkpoint")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: checkpoint format {manifest.get('format_version')} is not supported "
            f"(this scaletrain reads format {FORMAT_VERSION})"
        )
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise CheckpointError(f"{path}: missing or truncated (expected {size} bytes)")
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    state.update(extra_tensors or {})
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    return json.loads((folder / "trainer.json").read_text())
