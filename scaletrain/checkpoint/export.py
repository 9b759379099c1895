"""Weights out of and into scaletrain checkpoints, in one process (no process group needed).

  consolidated_tensors(ckpt)   full tensors of the `model` (or `ema`) section, read via DCP
  export_safetensors(ckpt, f)  one consolidated .safetensors file with scaletrain's names
  export_hf(ckpt, dir)         the recipe's Hugging Face folder (Recipe.hf.export)
  import_hf(dir, out)          a Hugging Face folder -> a complete scaletrain checkpoint
                               (model weights only: continue with --checkpoint.load_path)

Everything is read without unpickling (safe_io) and the source's manifest is checked first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from scaletrain.checkpoint.format import (
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    TRAINER_STATE,
    CheckpointError,
    check_file,
    file_entry,
    list_files,
    read_manifest,
    step_dir,
    write_manifest,
)
from scaletrain.checkpoint.safe_io import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from scaletrain.config import load_config
from scaletrain.registry import Recipe, get_recipe, known_recipes


def verified_manifest(folder: Path, checksum: bool = True) -> dict[str, Any]:
    manifest = read_manifest(folder)
    for name, entry in manifest["files"].items():
        problem = check_file(folder, name, entry, checksum)
        if problem:
            raise CheckpointError(problem)
    return manifest


def consolidated_tensors(folder: Path, section: str = "model") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of one section of a checkpoint, whatever layout saved it."""
    folder = Path(folder)
    verified_manifest(folder)
    prefix = section + "."
    stored = read_metadata(folder).state_dict_metadata
    tensors = {
        key[len(prefix) :]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in stored.items()
        if key.startswith(prefix) and hasattr(meta, "size")
    }
    if not tensors:
        sections = sorted({k.split(".", 1)[0] for k in stored})
        raise CheckpointError(f"{folder}: no {section!r} tensors; the checkpoint holds {sections}")
    dcp.load(
        {section: tensors},
        storage_reader=SafeFileSystemReader(str(folder)),
        planner=SafeLoadPlanner(),
        no_dist=not dist.is_initialized(),
    )
    return tensors


def trainer_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing — not a complete scaletrain checkpoint")
    return json.loads(path.read_text())


def _recipe_and_model_config(folder: Path) -> tuple[Recipe, Any]:
    state = trainer_state(folder)
    if "config" not in state:
        raise CheckpointError(f"{folder / TRAINER_STATE}: no model config (saved by scaletrain 0.1); cannot export")
    recipe = get_recipe(state["recipe"])
    return recipe, recipe.model.config(**state["config"]["model"])


def export_safetensors(folder: Path, out_file: Path, section: str = "model") -> Path:
    tensors = consolidated_tensors(folder, section)
    state = trainer_state(folder)
    meta = {"format": "pt", "scaletrain_step": str(state.get("step")), "scaletrain_recipe": str(state.get("recipe"))}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_file), meta)
    _readable_by_all(out_file)
    return out_file


def export_hf(folder: Path, out_dir: Path, section: str = "model") -> Path:
    recipe, _ = _recipe_and_model_config(Path(folder))
    if recipe.hf is None:
        raise ValueError(f"recipe {recipe.name!r} has no Hugging Face export; use --format safetensors")
    saved = trainer_state(folder)["config"]
    cfg = load_config(None, {**saved, "recipe": recipe.name})
    if "data" not in saved:
        cfg.data = None  # imported weights: the tokenizer they were trained with is not ours to write
    out_dir = Path(out_dir)
    recipe.hf.export(cfg, consolidated_tensors(Path(folder), section), out_dir)
    _readable_by_all(out_dir)
    return out_dir


def _readable_by_all(written: Path) -> None:
    """Give the written file (or every file in the written folder) the mode of any file this process creates:
    safetensors writes 0600, which keeps an exported model from being shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [written] if written.is_file() else written.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def import_hf(hf_dir: Path, out_root: Path) -> tuple[Path, dict[str, Any]]:
    """Write `out_root/step-00000000/`, a complete checkpoint of the HF weights; returns it and the model config."""
    hf_dir, out_root = Path(hf_dir), Path(out_root)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: missing — not a Hugging Face model folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    recipes = [get_recipe(n) for n in known_recipes()]
    recipe = next((r for r in recipes if r.hf is not None and model_type in r.hf.model_types), None)
    if recipe is None:
        readable = sorted(t for r in recipes if r.hf is not None for t in r.hf.model_types)
        raise ValueError(f"{config_file}: model_type {model_type!r} is not importable; known: {readable}")
    model_overrides, state_dict = recipe.hf.import_(hf_dir)
    final = step_dir(out_root, 0)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    dcp.save({"model": state_dict}, storage_writer=dcp.FileSystemWriter(str(partial)), no_dist=True)
    config = {"recipe": recipe.name, "model": model_overrides}
    num_params = sum(t.numel() for t in state_dict.values())
    state = {"step": 0, "recipe": recipe.name, "num_params": num_params, "config": config, "imported_from": str(hf_dir)}
    (partial / TRAINER_STATE).write_text(json.dumps(state))
    files = {name: file_entry(partial, name) for name in list_files(partial)}
    write_manifest(
        partial,
        {"format_version": FORMAT_VERSION, "step": 0, "layout": "imported", "world_size": 1,
         "num_params": num_params, "files": files},
    )  # fmt: skip
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final, model_overrides
