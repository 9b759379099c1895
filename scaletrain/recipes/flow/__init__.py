"""Flow recipe: RealNVP and Glow on images (the bundled shapes or a folder), trained by exact likelihood.

The loss is bits per dimension of the n_bits images, uniformly dequantized (model.py): below n_bits means
the flow beats the uniform distribution. Evaluation reports held-out bits/dim and a grid of samples drawn at
model.temperature. Glow's actnorm starts from data (`data_init`: the first model.init_samples items, the
same on every rank).

  scaletrain train scaletrain/recipes/flow/configs/glow-tiny.yaml
  scaletrain train scaletrain/recipes/flow/configs/glow-tiny.yaml --model.kind realnvp
  scaletrain sample runs/glow-tiny/checkpoints/step-00000400 --temperature 0.7 --out grid.png
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from scaletrain.checkpoint.loading import load_job_config, load_model
from scaletrain.config.schema import JobConfig
from scaletrain.distributed import destroy_distributed, init_distributed
from scaletrain.images.datasets import ImageDataConfig, image_dataset, seeded_generator
from scaletrain.images.grid import image_grid, save_png
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.recipes.flow.model import Flow, FlowConfig
from scaletrain.registry import DataSpec, EvalSpec, ModelSpec, Recipe, StepSpec, register_recipe
from scaletrain.validate import check_all


class FlowItems:
    """item i = {image, noise}: the dequantization noise u ~ U[0, 1) per value, seeded by (seed, i)."""

    def __init__(self, base: Any, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = self.base[int(i)]["image"]
        noise = torch.rand(image.shape, generator=seeded_generator("flow-u", self.seed, int(i)))
        return {"image": image, "noise": noise}


def build_dataset(cfg: JobConfig) -> FlowItems:
    return FlowItems(image_dataset(cfg), cfg.job.seed)


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"], batch["noise"]


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    m = cfg.model
    shape = (batch_size, m.in_channels, m.image_size, m.image_size)
    return {"image": torch.empty(shape, device="meta"), "noise": torch.empty(shape, device="meta")}


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return output  # Flow.forward returns the mean bits/dim


def _stack(items: list[dict[str, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.stack([item[k] for item in items]).to(device) for k in ("image", "noise"))  # type: ignore[return-value]


@torch.no_grad()
def data_init(model: nn.Module, cfg: JobConfig, dataset: Any) -> str:
    """Actnorm's data-dependent init from items 0..init_samples-1, on every rank alike (no communication)."""
    n = min(cfg.model.init_samples, len(dataset))
    device = next(model.parameters()).device
    model(*_stack([dataset[i] for i in range(n)], device), mode="init")
    return f"data-dependent init: actnorm from items 0-{n - 1} (every rank the same)"


def held_out(cfg: JobConfig, n: int) -> list[dict[str, torch.Tensor]]:
    """n items the training never reads: on the shapes data the ones after data.num_samples (the set is
    procedural); on a folder its last n images (also trained on: a folder has no held-out split yet)."""
    items = FlowItems(image_dataset(cfg), cfg.job.seed + 1)
    if cfg.data.source == "shapes":
        indices = range(cfg.data.num_samples, cfg.data.num_samples + n)
    else:
        indices = range(max(0, len(items) - n), len(items))
    return [items[i] for i in indices]


@torch.no_grad()
def generate(model: nn.Module, cfg: JobConfig, n: int, temperature: float, seed: int) -> torch.Tensor:
    m = cfg.model
    device = next(model.parameters()).device
    z = torch.randn(n, m.in_channels, m.image_size, m.image_size, generator=torch.Generator().manual_seed(seed))
    return model(torch.zeros_like(z).to(device), (z * temperature).to(device), mode="sample").float().cpu()


@torch.no_grad()
def evaluate(model: nn.Module, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """Held-out bits/dim (and the uniform baseline, model.n_bits) and a grid sampled at model.temperature."""
    device = next(model.parameters()).device
    image, noise = _stack(held_out(cfg, cfg.eval.num_samples), device)
    bits = model(image, noise, mode="bits").float()
    logger.log_image(step, "samples", image_grid(generate(model, cfg, cfg.eval.num_samples, cfg.model.temperature, 0)))
    return {"bits_per_dim_heldout": bits.mean().item(), "bits_per_dim_uniform": float(cfg.model.n_bits)}


def sample(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scaletrain sample", description="Sample a PNG grid from a flow checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step-XXXXXXXX)")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--temperature", type=float, default=None, help="latent std (default: model.temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.add_argument("--ema", choices=["auto", "yes", "no"], default="auto", help="use the EMA weights if present")
    p.add_argument("--config", default=None, help="training config YAML, when the checkpoint does not carry one")
    args, overrides = p.parse_known_args(argv)
    if args.n < 1:
        raise ValueError(f"--n: {args.n} is not allowed; use >= 1")
    from pathlib import Path

    folder = Path(args.checkpoint)
    cfg = load_job_config(folder, "flow", args.config, overrides)
    temperature = cfg.model.temperature if args.temperature is None else args.temperature
    if temperature <= 0:
        raise ValueError(f"--temperature: {temperature} is not allowed; use > 0")
    init_distributed("auto")
    try:
        images = generate(load_model(folder, "flow", cfg, args.ema), cfg, args.n, temperature, args.seed)
    finally:
        destroy_distributed()
    save_png(image_grid(images, min(8, args.n)), args.out)
    print(f"wrote {args.out}: {args.n} images at temperature {temperature}")


def parallelize(model: Flow, dims: ParallelDims, cfg: JobConfig) -> Flow:
    """Activation checkpointing -> compile -> FSDP2/DDP, one unit per flow layer."""
    layers = [layer for level in model.levels for layer in level.layers]
    return checkpoint_compile_and_shard(model, layers, dims, cfg)


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    halvings = m.levels if m.kind == "glow" else m.levels - 1
    check_all(
        [
            (m.levels >= 1, f"model.levels: {m.levels} is not allowed; use >= 1"),
            (m.steps >= 1, f"model.steps: {m.steps} is not allowed; use >= 1"),
            (m.image_size % 2**halvings == 0,
             f"model.image_size: {m.image_size} cannot be squeezed {halvings} times (model.levels={m.levels}, "
             f"{m.kind}); use a multiple of {2**halvings}"),
            (1 <= m.n_bits <= 8, f"model.n_bits: {m.n_bits} is not allowed; use 1..8"),
            (m.hidden >= 1, f"model.hidden: {m.hidden} is not allowed; use >= 1"),
            (m.init_samples >= 1, f"model.init_samples: {m.init_samples} is not allowed; use >= 1"),
            (m.temperature > 0, f"model.temperature: {m.temperature} is not allowed; use > 0"),
            (d.source != "shapes" or m.in_channels == 3, "model.in_channels: the shapes data set is RGB; use 3"),
        ]
    )  # fmt: skip
    if d.source == "folder":
        image_dataset(cfg)


register_recipe(
    Recipe(
        name="flow",
        model=ModelSpec(config=FlowConfig, build=Flow, parallelize=parallelize, data_init=data_init),
        data=DataSpec(config=ImageDataConfig, build_dataset=build_dataset, example_batch=example_batch),
        step=StepSpec(model_inputs=model_inputs, loss=loss),
        validate=validate,
        evaluation=EvalSpec(evaluate=evaluate, sample=sample),
    )
)
