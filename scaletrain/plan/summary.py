"""Parameter and FLOP counts of a config's model, from the meta device (config show, the planner)."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.config.schema import JobConfig
from scaletrain.registry import get_recipe


def model_summary(cfg: JobConfig, model: nn.Module | None = None) -> dict[str, float]:
    """Parameter and FLOP counts from a meta-device model (`model`, or one built here): free even for 70B
    configs."""
    from scaletrain.train import count_params, flops_per_sample

    recipe = get_recipe(cfg.recipe)
    if model is None:
        with torch.device("meta"):
            model = recipe.model.build(cfg.model)
    flops = flops_per_sample(recipe, cfg, model)
    units = recipe.data.units_per_sample(cfg)
    total = count_params(model)
    active = recipe.model.active_parameters(model, cfg.model) if recipe.model.active_parameters else total
    # Several networks: each one's size (a GAN's generator and discriminator are sized separately).
    named = [*(p.trains for p in recipe.step.phases(cfg)), *recipe.step.frozen] if recipe.step.phases else []
    per_network = {f"parameters.{name}": count_params(model.get_submodule(name)) for name in dict.fromkeys(named)}
    return {
        "parameters": total,
        **per_network,
        **({"active_parameters": active} if active != total else {}),  # models that route (MoE)
        "train_flops_per_sample": flops,
        f"train_flops_per_{recipe.data.unit[:-1]}": flops / units,
        "train_flops_per_step": flops * cfg.train.global_batch_size,
    }
