"""PixelCNN recipe: Gated PixelCNN with class conditioning on images (the bundled shapes or a folder),
trained by exact likelihood (bits/dim of the n_bits images); softmax or discretized-logistic-mixture output.

Evaluation reports held-out bits/dim (shapes items past data.num_samples, never trained on) beside the
uniform baseline (model.n_bits), and a grid sampled autoregressively, every class in turn.

  scaletrain train scaletrain/recipes/pixelcnn/configs/pixelcnn-tiny.yaml
  scaletrain train scaletrain/recipes/pixelcnn/configs/pixelcnn-tiny.yaml --model.output logistic_mixture
  scaletrain sample runs/pixelcnn-tiny/checkpoints/step-00000600 --n 36 --class 2 --out grid.png
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from scaletrain.config.schema import JobConfig
from scaletrain.images.datasets import SHAPES, ImageDataConfig, image_dataset
from scaletrain.images.grid import image_grid
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.recipes.pixelcnn.model import PixelCNN, PixelCNNConfig
from scaletrain.recipes.pixelcnn.sample import generate, sample
from scaletrain.registry import DataSpec, EvalSpec, ModelSpec, Recipe, StepSpec, register_recipe
from scaletrain.validate import check_all


def build_dataset(cfg: JobConfig) -> Any:
    return image_dataset(cfg)  # items {image, label}: a PixelCNN's loss needs no randomness


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"], batch["label"]


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    m = cfg.model
    return {
        "image": torch.empty(batch_size, m.in_channels, m.image_size, m.image_size, device="meta"),
        "label": torch.zeros(batch_size, dtype=torch.long, device="meta"),
    }


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return output  # PixelCNN.forward returns the mean bits/dim


def held_out(cfg: JobConfig, n: int) -> list[dict[str, torch.Tensor]]:
    """n items the training never reads: on the shapes data the ones after data.num_samples (the set is
    procedural); on a folder its last n images (also trained on: a folder has no held-out split yet)."""
    items = image_dataset(cfg)
    if cfg.data.source == "shapes":
        indices = range(cfg.data.num_samples, cfg.data.num_samples + n)
    else:
        indices = range(max(0, len(items) - n), len(items))
    return [items[i] for i in indices]


@torch.no_grad()
def evaluate(model: nn.Module, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """Held-out bits/dim over eval.num_samples items (the uniform baseline is model.n_bits) and a grid of
    model.eval_grid samples at model.temperature, every class in turn (one column per class)."""
    m = cfg.model
    device = next(model.parameters()).device
    items = held_out(cfg, cfg.eval.num_samples)
    bits = []
    for start in range(0, len(items), 64):  # bounded memory for a large eval.num_samples
        chunk = items[start : start + 64]
        image = torch.stack([item["image"] for item in chunk]).to(device)
        label = torch.stack([item["label"] for item in chunk]).to(device)
        bits.append(model(image, label, mode="bits").float().cpu())
    labels = torch.arange(m.eval_grid) % max(1, m.num_classes)
    images = generate(model, m, labels, m.temperature, seed=cfg.job.seed)
    logger.log_image(step, "samples", image_grid(images, m.num_classes or None))
    return {"bits_per_dim_heldout": torch.cat(bits).mean().item(), "bits_per_dim_uniform": float(m.n_bits)}


def parallelize(model: PixelCNN, dims: ParallelDims, cfg: JobConfig) -> PixelCNN:
    """Activation checkpointing -> compile -> FSDP2/DDP, one unit per gated layer."""
    layers = list(model.layers)
    return checkpoint_compile_and_shard(model, layers, dims, cfg)


def _odd(k: int) -> bool:
    return k >= 3 and k % 2 == 1


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    groups = m.in_channels if m.output == "softmax" else 1
    check_all(
        [
            (_odd(m.kernel_size), f"model.kernel_size: {m.kernel_size} is not allowed; use an odd size >= 3 "
                                  "(3, 5, 7): the kernel is centred on the current column"),
            (_odd(m.first_kernel_size), f"model.first_kernel_size: {m.first_kernel_size} is not allowed; use an "
                                        "odd size >= 3 (3, 5, 7): the kernel is centred on the current column"),
            (1 <= m.n_bits <= 8, f"model.n_bits: {m.n_bits} is not allowed; use 1..8"),
            (m.n_layers >= 1, f"model.n_layers: {m.n_layers} is not allowed; use >= 1"),
            (m.in_channels in (1, 3), f"model.in_channels: {m.in_channels} is not allowed; use 1 or 3"),
            (m.hidden >= groups, f"model.hidden: {m.hidden} is not allowed; use >= {groups} (one feature group "
                                 "per colour channel)"),
            (m.num_classes >= 0, f"model.num_classes: {m.num_classes} is not allowed; use 0 (unconditional) or more"),
            (d.source != "shapes" or m.num_classes <= len(SHAPES),
             f"model.num_classes: {m.num_classes} is not allowed with data.source=shapes; the shapes data set has "
             f"{len(SHAPES)} classes, use 1..{len(SHAPES)} (or 0, unconditional)"),
            (m.n_mixtures >= 1, f"model.n_mixtures: {m.n_mixtures} is not allowed; use >= 1"),
            (m.temperature > 0, f"model.temperature: {m.temperature} is not allowed; use > 0"),
            (m.eval_grid >= 1, f"model.eval_grid: {m.eval_grid} is not allowed; use >= 1"),
            (m.image_size >= 2, f"model.image_size: {m.image_size} is not allowed; use >= 2"),
            (d.source != "shapes" or m.in_channels == 3, "model.in_channels: the shapes data set is RGB; use 3"),
        ]
    )  # fmt: skip
    image_dataset(cfg)  # last: shapes check their size; a folder is read, and its classes checked against num_classes


register_recipe(
    Recipe(
        name="pixelcnn",
        model=ModelSpec(config=PixelCNNConfig, build=PixelCNN, parallelize=parallelize),
        data=DataSpec(config=ImageDataConfig, build_dataset=build_dataset, example_batch=example_batch),
        step=StepSpec(model_inputs=model_inputs, loss=loss),
        validate=validate,
        evaluation=EvalSpec(evaluate=evaluate, sample=sample),
    )
)
