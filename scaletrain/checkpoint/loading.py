"""Weights out of a training checkpoint for one-process use (sampling, evaluation, encoding a latent cache):
the job config it was trained with, and its model with the raw or the EMA weights.

The config comes from the checkpoint's trainer.json ("config") when the trainer stored it, else from a
training YAML given by the caller (plus its --section.field overrides).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint.safe_io import read_metadata
from scaletrain.checkpoint.store import ModuleState, load_checkpoint
from scaletrain.config import load_config
from scaletrain.config.schema import JobConfig
from scaletrain.distributed import training_device_type
from scaletrain.parallel import init_model
from scaletrain.registry import get_recipe


def checkpoint_recipe(folder: Path) -> dict[str, Any]:
    trainer_json = folder / "trainer.json"
    if not trainer_json.is_file():
        raise ValueError(f"{folder}: not a complete scaletrain checkpoint (no trainer.json)")
    return json.loads(trainer_json.read_text())


def load_job_config(folder: Path, recipe_name: str, config_path: str | None, overrides: list[str]) -> JobConfig:
    trainer = checkpoint_recipe(folder)
    if trainer.get("recipe") != recipe_name:
        raise ValueError(
            f"{folder}: this is a checkpoint of recipe {trainer.get('recipe')!r}, not {recipe_name!r}; "
            f"sample it with that recipe's command"
        )
    if config_path is not None or "config" not in trainer:
        if config_path is None:
            raise ValueError(f"{folder}: the checkpoint does not store its config; pass --config <training yaml>")
        cfg = load_config(config_path, overrides)
    else:
        cfg = load_config(None, dict(trainer["config"]))  # the resolved config the trainer stored
    if cfg.recipe != recipe_name:
        raise ValueError(f"--config: {config_path} is a {cfg.recipe!r} config, but the checkpoint is {recipe_name!r}")
    return cfg


def ema_names(folder: Path) -> set[str]:
    """The parameters the checkpoint holds EMA weights of (all trained ones; a GAN's generator only)."""
    metadata = read_metadata(folder)
    return {k.removeprefix("ema.") for k in metadata.state_dict_metadata if k.startswith("ema.")}


def _has_ema(folder: Path) -> bool:
    return bool(ema_names(folder))


def load_model(folder: Path, recipe_name: str, cfg: JobConfig, ema: str = "auto") -> torch.nn.Module:
    """Build the recipe's model, load the checkpoint's weights (EMA if asked/available). Needs a process group."""
    recipe = get_recipe(recipe_name)
    device = torch.device(training_device_type())
    with torch.device("meta"):
        model = recipe.model.build(cfg.model)
    init_model(model, device, cfg.job.seed)
    use_ema = _has_ema(folder) if ema == "auto" else ema == "yes"
    extra: dict[str, dict[str, torch.Tensor]] = {}
    if use_ema:
        if not _has_ema(folder):
            raise ValueError(f"{folder}: --ema yes, but the checkpoint has no EMA weights (train.ema_decay=0)")
        names = ema_names(folder)
        extra["ema"] = {n: torch.empty_like(p) for n, p in model.named_parameters() if n in names}
    load_checkpoint(folder, ModuleState(model), extra_tensors=extra)
    if use_ema:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in extra["ema"]:
                    p.copy_(extra["ema"][n])
    return model.eval()
