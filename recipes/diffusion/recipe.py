"""What the diffusion recipes give the core: datasets, inputs, loss, checks, eval grids.

The batch is built entirely in the data set (see data.py): {x_t, t, y, target}. The model
maps (x_t, t, y) to its prediction and the loss is the plain mean-squared error against
`target` — DDPM's "simple" loss for eps/x0/v prediction, and the rectified-flow loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recipes.diffusion.data import SHAPES, DiffusionItems, ImageFolderDataset, ShapesDataset, auto_repeats
from recipes.diffusion.process import Process, sample
from scaletrain.config.schema import JobConfig
from scaletrain.parallel.dims import ParallelDims


def make_process(model_cfg: Any) -> Process:
    return Process(model_cfg.schedule, model_cfg.prediction, model_cfg.timesteps)


def image_dataset(cfg: JobConfig) -> Any:
    """The clean images {image, label} that the denoiser (or the VAE) trains on."""
    m, d = cfg.model, cfg.data
    num_classes = getattr(m, "num_classes", 0)  # the VAE has no classes
    if d.source == "shapes":
        return ShapesDataset(d.num_samples, m.image_size, num_classes or len(SHAPES), seed=d.shapes_seed)
    if d.source == "folder":
        if not d.path:
            raise ValueError("data.path: data.source=folder needs data.path (a folder of PNG/JPEG images)")
        dataset = ImageFolderDataset(d.path, m.image_size, m.in_channels)
        if num_classes > 0 and not dataset.labelled:
            raise ValueError(
                f"model.num_classes: class conditioning ({num_classes} classes) needs labelled data, but "
                f"{d.path!r} has no class sub-folders (root/<class>/*.png); set model.num_classes=0 to train "
                "unconditionally"
            )
        if num_classes > 0 and dataset.num_classes > num_classes:
            raise ValueError(
                f"model.num_classes: {d.path!r} has {dataset.num_classes} class folders but model.num_classes="
                f"{num_classes}"
            )
        return dataset
    raise ValueError(f"data.source: {d.source!r} is not supported by recipe {cfg.recipe!r}")


def build_dataset(cfg: JobConfig) -> DiffusionItems:
    m, d = cfg.model, cfg.data
    if d.source == "latents":
        from recipes.diffusion.latents import LatentDataset

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
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if d.source == "folder":
        image_dataset(cfg)  # empty / missing / unlabelled folders fail before any process starts
    if d.source == "latents":
        from recipes.diffusion.latents import check_latent_config

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
    ]
    tp = dims.tp
    if tp > 1:
        checks += [
            (m.n_heads % tp == 0, f"parallel.tp: {tp} does not divide model.n_heads={m.n_heads}"),
            (m.hidden_dim % tp == 0, f"parallel.tp: {tp} does not divide the MLP hidden width {m.hidden_dim}"),
        ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def validate_unet(cfg: JobConfig, dims: ParallelDims) -> None:
    validate_common(cfg, dims)
    m = cfg.model
    if dims.tp > 1:
        raise ValueError(
            f"parallel.tp: {dims.tp} is not supported by the U-Net (data parallel only); use tp=1 or the DiT"
        )
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
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


# -- sampling --------------------------------------------------------------------------------------
def class_labels(num_classes: int, n: int, requested: int | None) -> torch.Tensor:
    """Labels for a grid: the requested class everywhere, or every class in turn."""
    if num_classes == 0:
        if requested is not None:
            raise ValueError("--class: the model is unconditional (model.num_classes=0)")
        return torch.zeros(n, dtype=torch.int64)
    if requested is not None:
        if not 0 <= requested < num_classes:
            raise ValueError(f"--class: {requested} is not a class of this model (0..{num_classes - 1})")
        return torch.full((n,), requested, dtype=torch.int64)
    return torch.arange(n, dtype=torch.int64) % num_classes


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
) -> torch.Tensor:
    """Images x_BCHW in [-1, 1] from a denoiser, in chunks of `batch_size` (all ranks call it together)."""
    process = make_process(model_cfg)
    device = next(model.parameters()).device
    null = model_cfg.num_classes if model_cfg.num_classes > 0 else None
    shape = (model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    chunks = []
    for start in range(0, len(labels), batch_size):
        part = labels[start : start + batch_size]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
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
            generator=generator,
            device=device,
        )
        chunks.append(decode(x) if decode is not None else x)
    return torch.cat(chunks).clamp(-1, 1)


def image_grid(x_BCHW: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile images in [-1, 1] into one CHW grid in [0, 1] (row-major, `ncol` per row)."""
    B, C, H, W = x_BCHW.shape
    ncol = ncol or math.ceil(math.sqrt(B))
    nrow = math.ceil(B / ncol)
    grid = torch.ones(C, nrow * (H + pad) + pad, ncol * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, ncol)
        top, left = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, top : top + H, left : left + W] = (x_BCHW[i].float().cpu() + 1) / 2
    return grid.clamp(0, 1)


def save_png(grid_CHW: torch.Tensor, path: str) -> None:
    from PIL import Image

    array = (grid_CHW.permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def evaluate(model: nn.Module, cfg: JobConfig, step: int, logger: Any) -> dict[str, float]:
    """Every eval.interval steps: a grid of eval.num_samples samples (every class in turn) to TensorBoard,
    and on the bundled shapes, sample-quality metrics from the shipped shapes classifier."""
    m = cfg.model
    labels = class_labels(m.num_classes, cfg.eval.num_samples, None)
    images = generate(
        model,
        m,
        labels,
        sampler=m.eval_sampler,
        steps=m.eval_steps,
        guidance=m.eval_guidance,
        seed=cfg.job.seed,
        decode=_eval_decoder(cfg),
    )
    ncol = m.num_classes if 0 < m.num_classes <= 16 else None
    logger.log_image(step, "samples", image_grid(images, ncol))
    return shapes_metrics(cfg, images, labels)


def to_classifier_size(x_BCHW: torch.Tensor, size: int = 32) -> torch.Tensor:
    if x_BCHW.shape[-1] == size:
        return x_BCHW
    return F.interpolate(x_BCHW.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def shapes_metrics(cfg: JobConfig, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """FID/KID against as many real shapes, and the share of samples the classifier labels as
    the requested class. Features are the shapes classifier's ("*_shapes"), not Inception's:
    comparable between runs on the bundled data only. Images of other sizes are resized to the
    classifier's 32 px (bilinear; real 16 px shapes resized so are still labelled 99.7% right).
    Empty unless the data is shapes."""
    from recipes.diffusion.metrics import extract, fid, kid, shapes_classifier

    size = images.shape[-1]
    if cfg.data.source not in ("shapes", "latents") or images.shape[1] != 3:
        return {}
    if cfg.data.source == "latents" and cfg.data.path:
        from recipes.diffusion.latents import read_index

        if read_index(cfg.data.path)["vae_config"]["data"]["source"] != "shapes":
            return {}
    n = len(images)
    real_data = ShapesDataset(n, size, len(SHAPES), seed=cfg.data.shapes_seed + 1)
    real = torch.stack([real_data[i]["image"] for i in range(n)])
    classifier = shapes_classifier(32, len(SHAPES))
    fake_features, predicted = extract(classifier, to_classifier_size(images.cpu()))
    real_features, _ = extract(classifier, to_classifier_size(real))
    out = {"fid_shapes": fid(real_features, fake_features)}
    if n >= 4:
        out["kid_shapes"] = kid(real_features, fake_features, subsets=10, subset_size=min(n, 100))[0]
    num_classes = getattr(cfg.model, "num_classes", 0)
    if num_classes > 0:
        out["class_accuracy_shapes"] = float((predicted == labels.numpy()).mean())
    return out


_DECODERS: dict[str, Any] = {}


def _eval_decoder(cfg: JobConfig) -> Any:
    if cfg.data.source != "latents":
        return None
    from recipes.diffusion.latents import load_cache_decoder

    if cfg.data.path not in _DECODERS:  # loaded once per process, at the first evaluation
        _DECODERS[cfg.data.path] = load_cache_decoder(cfg.data.path)
    return _DECODERS[cfg.data.path]
