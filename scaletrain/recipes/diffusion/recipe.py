"""What the diffusion recipes give the core: datasets, inputs, loss, checks, eval grids.

The batch is built entirely in the data set (see data.py): {x_t, t, y, target}. The model
maps (x_t, t, y) to its prediction and the loss is the plain mean-squared error against
`target` — DDPM's "simple" loss for eps/x0/v prediction, and the rectified-flow loss.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scaletrain import ops
from scaletrain.config.schema import JobConfig
from scaletrain.images.datasets import SHAPES, image_dataset, seeded_generator
from scaletrain.images.grid import class_labels, image_grid, save_png
from scaletrain.parallel.dims import ParallelDims
from scaletrain.recipes.diffusion.data import DiffusionItems, auto_repeats
from scaletrain.recipes.diffusion.process import Process, sample
from scaletrain.validate import check_all


def real_data_section(cfg: JobConfig) -> Any | None:
    """The data section of the images the model learns (for a latent DiT: its VAE's), which FID compares
    samples with; None if unknown."""
    data = cfg.data
    if data.source == "latents":
        if not data.path:
            return None
        from scaletrain.recipes.diffusion.latents import read_index

        data = SimpleNamespace(**read_index(data.path)["vae_config"]["data"])
    return data if data.source in ("shapes", "folder") else None


def make_process(model_cfg: Any) -> Process:
    return Process(model_cfg.schedule, model_cfg.prediction, model_cfg.timesteps, model_cfg.time_sampling)


def build_dataset(cfg: JobConfig) -> DiffusionItems:
    m, d = cfg.model, cfg.data
    if d.source == "latents":
        from scaletrain.recipes.diffusion.latents import LatentDataset

        base, key = LatentDataset(d.path, seed=cfg.job.seed), "latent"
    else:
        base, key = image_dataset(cfg), "image"
    repeats = 1 if d.source == "shapes" else auto_repeats(len(base), d.noise_draws)
    return DiffusionItems(base, make_process(m), cfg.job.seed, m.num_classes, m.class_dropout, repeats, key=key)


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    """A meta-device batch shaped like the data (FLOP counting without reading any data)."""
    m = cfg.model
    image = (batch_size, m.in_channels, m.image_size, m.image_size)
    return {
        "x_t": torch.empty(image, device="meta"),
        "t": torch.empty(batch_size, device="meta"),
        "y": torch.zeros(batch_size, dtype=torch.int64, device="meta"),
        "target": torch.empty(image, device="meta"),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch["x_t"], batch["t"], batch["y"]


def loss(out_BCHW: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # fp32 reduction: bf16 squared errors summed over a batch lose the small residuals.
    return F.mse_loss(out_BCHW.float(), batch["target"].float())


def validate_common(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    make_process(m)  # raises on a bad schedule/prediction pair
    checks = [
        (m.image_size >= 1, f"model.image_size: {m.image_size} is not allowed; use >= 1"),
        (m.in_channels >= 1, f"model.in_channels: {m.in_channels} is not allowed; use >= 1"),
        (m.num_classes >= 0, f"model.num_classes: {m.num_classes} is not allowed; use >= 0"),
        (0 <= m.class_dropout < 1, f"model.class_dropout: {m.class_dropout} is not allowed; use a value in [0, 1)"),
        (m.eval_steps >= 1, f"model.eval_steps: {m.eval_steps} is not allowed; use >= 1"),
        (d.num_samples >= 1, f"data.num_samples: {d.num_samples} is not allowed; use >= 1"),
        (d.noise_draws >= 0, f"data.noise_draws: {d.noise_draws} is not allowed; use >= 0 (0 = automatic)"),
        (d.num_workers >= 0, f"data.num_workers: {d.num_workers} is not allowed; use >= 0"),
        (cfg.eval.num_samples >= 1, f"eval.num_samples: {cfg.eval.num_samples} is not allowed; use >= 1"),
    ]
    if d.source == "shapes":
        checks += [
            (m.in_channels == 3, f"model.in_channels: the shapes data set is RGB; use 3, not {m.in_channels}"),
            (
                m.num_classes <= len(SHAPES),
                f"model.num_classes: the shapes data set has {len(SHAPES)} classes, got {m.num_classes}",
            ),
        ]
    if d.source == "latents":
        checks += [
            (bool(d.path), "data.path: data.source=latents needs the latent cache folder in data.path"),
            (not m.clip_x0, "model.clip_x0: latents are not confined to [-1, 1]; set model.clip_x0=false"),
        ]
    check_all(checks)


def check_data_files(cfg: JobConfig) -> None:
    """The checks that read files (image folder, latent cache, Inception weights): each validator runs them
    last, so a config whose data lives elsewhere is otherwise fully checked (MissingDataError)."""
    m, d = cfg.model, cfg.data
    if d.source == "folder":
        image_dataset(cfg)  # empty / missing / unlabelled folders fail before any process starts
    if m.eval_inception_weights:
        from scaletrain.images.inception import check_weights_file

        check_weights_file(m.eval_inception_weights)
    if d.source == "latents":
        from scaletrain.recipes.diffusion.latents import check_latent_config

        check_latent_config(cfg)


def validate_dit(cfg: JobConfig, dims: ParallelDims) -> None:
    validate_common(cfg, dims)
    m = cfg.model
    checks = [
        (
            m.image_size % m.patch_size == 0,
            f"model.image_size: {m.image_size} is not divisible by model.patch_size={m.patch_size}",
        ),
        (m.dim % m.n_heads == 0, f"model.dim: {m.dim} is not divisible by model.n_heads={m.n_heads}"),
        (m.depth >= 1, f"model.depth: {m.depth} is not allowed; use >= 1"),
        (
            m.attention != "triton" or ops.triton_attention_supports(m.dim // m.n_heads),
            f"model.attention: triton needs a head dim that is a power of two in [16, 128]; "
            f"model.dim/model.n_heads = {m.dim // max(m.n_heads, 1)}",
        ),
    ]
    tp = dims.tp
    if tp > 1:
        checks += [
            (m.n_heads % tp == 0, f"parallel.tp: {tp} does not divide model.n_heads={m.n_heads}"),
            (m.hidden_dim % tp == 0, f"parallel.tp: {tp} does not divide the MLP hidden width {m.hidden_dim}"),
        ]
    check_all(checks)
    check_data_files(cfg)


def validate_unet(cfg: JobConfig, dims: ParallelDims) -> None:
    validate_common(cfg, dims)
    m = cfg.model
    factor = 2 ** (len(m.channel_mult) - 1)
    checks = [
        (len(m.channel_mult) >= 1, "model.channel_mult: give at least one level"),
        (
            m.image_size % factor == 0,
            f"model.image_size: {m.image_size} is not divisible by {factor}, the U-Net's "
            f"downsampling (2^(len(model.channel_mult)-1))",
        ),
        (m.blocks_per_level >= 1, f"model.blocks_per_level: {m.blocks_per_level} is not allowed; use >= 1"),
        (0 <= m.dropout < 1, f"model.dropout: {m.dropout} is not allowed; use a value in [0, 1)"),
    ]
    for mult in m.channel_mult:
        c = m.channels * mult
        checks.append((c % min(m.groups, c) == 0, f"model.groups: {m.groups} does not divide {c} channels"))
        checks.append((c % max(1, c // 32) == 0, f"model.channels: {c} channels do not split into heads of ~32"))
        if m.attention == "triton":
            head_dim = c // max(1, c // 32)
            checks.append(
                (
                    ops.triton_attention_supports(head_dim),
                    f"model.attention: triton needs a head dim that is a power of two in [16, 128]; "
                    f"{c} channels give heads of {head_dim}",
                )
            )
    check_all(checks)
    check_data_files(cfg)


# -- sampling --------------------------------------------------------------------------------------
def generate(
    model: nn.Module,
    model_cfg: Any,
    labels: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    eta: float = 0.0,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    decode: Any = None,
    first_index: int = 0,
) -> torch.Tensor:
    """Images x_BCHW in [-1, 1] from a denoiser, in chunks of `batch_size`.

    Image k is a function of (seed, first_index + k, labels[k]) only — its noise comes from its
    own generator — so a grid is the same whatever the batch size or the split across ranks.
    """
    process = make_process(model_cfg)
    device = next(model.parameters()).device
    null = model_cfg.num_classes if model_cfg.num_classes > 0 else None
    shape = (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    chunks = []
    for start in range(0, len(labels), batch_size):
        part = labels[start : start + batch_size]
        generators = [seeded_generator("sample", seed, first_index + start + k) for k in range(len(part))]
        x = sample(
            lambda x, t, y: model(x, t, y).float(),
            process,
            (len(part), *shape),
            part,
            sampler=sampler,
            steps=steps,
            eta=eta,
            guidance=guidance,
            null_label=null,
            clip_x0=model_cfg.clip_x0,
            generator=generators,
            device=device,
        )
        chunks.append(decode(x) if decode is not None else x)
    return torch.cat(chunks).clamp(-1, 1)


def generate_sharded(
    model: nn.Module, cfg: JobConfig, dims: ParallelDims, labels: torch.Tensor, **kwargs: Any
) -> torch.Tensor | None:
    """`generate` with the samples split across data-parallel ranks; the whole set on rank 0, None elsewhere.

    Every rank must run the same forwards (FSDP all-gathers weights inside them, TP all-reduces),
    so each data-parallel index draws ceil(n / dp) samples — the last ones past n only as
    padding — and ranks of one index (tp/cp peers) draw the same ones. Since image k depends on
    (seed, k) only, the set equals a one-process `generate`.
    """
    n = len(labels)
    if dims.dp_size == 1:
        images = generate(model, cfg.model, labels, **kwargs)
        return images if not dist.is_initialized() or dist.get_rank() == 0 else None
    dp_rank, dp_size = dims.dp_coordinates()
    per = math.ceil(n / dp_size)
    padded = torch.cat([labels, labels.new_zeros(per * dp_size - n)])
    mine = padded[dp_rank * per : (dp_rank + 1) * per]
    images = generate(model, cfg.model, mine, first_index=dp_rank * per, **kwargs)
    # Rank 0's data-parallel group (the ranks with its tp and cp coordinates) holds one copy of every
    # sample: gather over it, on the device the backend serves (NCCL: CUDA). The other groups hold copies.
    if dims.axis("tp").get_local_rank() != 0 or dims.axis("cp").get_local_rank() != 0:
        return None
    group = dims.axis("dp").get_group()
    device = next(model.parameters()).device
    local = images.to(device).contiguous()
    gathered = [torch.empty_like(local) for _ in range(dp_size)] if dp_rank == 0 else None
    dist.gather(local, gathered, group_dst=0, group=group)
    if dist.get_rank() != 0:
        return None
    return torch.cat([g.cpu() for g in gathered])[:n]


def evaluate(model: nn.Module, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """Every eval.interval steps: eval.num_samples samples (every class in turn), generated in
    shards across the data-parallel ranks and gathered on rank 0, which writes the grid to
    TensorBoard and computes FID/KID (scaletrain/images/quality.py). Other ranks return {}."""
    m = cfg.model
    labels = class_labels(m.num_classes, cfg.eval.num_samples, None)
    images = generate_sharded(
        model,
        cfg,
        dims,
        labels,
        sampler=m.eval_sampler,
        steps=m.eval_steps,
        guidance=m.eval_guidance,
        seed=cfg.job.seed,
        decode=_eval_decoder(cfg),
    )
    if images is None:
        return {}
    ncol = m.num_classes if 0 < m.num_classes <= 16 else None
    grid = image_grid(images, ncol)
    logger.log_image(step, "samples", grid)
    # Also as a PNG beside the checkpoints, to look at without TensorBoard.
    png = Path(cfg.job.run_dir) / cfg.job.name / "samples" / f"step-{step:08d}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, str(png))
    from scaletrain.images.quality import sample_metrics

    return sample_metrics(cfg, images, labels, data=real_data_section(cfg))


def denoiser_startup_notes(model: nn.Module, cfg: JobConfig, dims: ParallelDims) -> list[str]:
    """The kernels line, then (with evaluation on) which extractor makes which eval numbers. Only rank 0
    prints and evaluates, so only it loads the extractors (an Inception file is read here, before step 1)."""
    from scaletrain.images.quality import feature_labels
    from scaletrain.recipes.diffusion.parallelize import startup_notes

    lines = startup_notes(model, cfg, dims)
    if cfg.eval.interval and (not dist.is_initialized() or dist.get_rank() == 0):
        lines += [f"eval features: {line}" for line in feature_labels(cfg, data=real_data_section(cfg))]
    return lines


def _eval_decoder(cfg: JobConfig) -> Any:
    return _cache_decoder(cfg.data.path) if cfg.data.source == "latents" else None


@functools.cache
def _cache_decoder(path: str) -> Any:
    """The VAE decoder of a latent cache, loaded once per process, at the first evaluation."""
    from scaletrain.recipes.diffusion.latents import load_cache_decoder

    return load_cache_decoder(path)
