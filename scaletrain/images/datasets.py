"""Image data for every image family: the bundled procedural shapes and user image folders.

Every item is a pure function of its index (the core's loader owns order and sharding), so each
parallel layout sees the same batches:
  - `ShapesDataset`: coloured shapes (circle, square, triangle, cross, ring, diamond) drawn with
    anti-aliased signed distances from a generator seeded by (seed, index). Class = shape =
    index % num_classes, so classes are balanced. Nothing is downloaded or stored.
  - `ImageFolderDataset`: root/<class>/*.png|jpg (labelled) or root/*.png|jpg (unlabelled),
    centre-cropped and resized to a square.

Images are float32 in [-1, 1], shape C x H x W (x_CHW).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from scaletrain.config.schema import opt

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def item_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple (hashed, so nearby tuples give unrelated streams)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*parts: Any) -> torch.Generator:
    """A torch.Generator seeded from any tuple: per-sample randomness that no layout can change."""
    return torch.Generator().manual_seed(item_seed(*parts))


def _shape_sdf(kind: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Approximate signed distance (pixels, < 0 inside) of a shape of radius r centred at 0."""
    ax, ay = dx.abs(), dy.abs()
    if kind == "circle":
        return torch.sqrt(dx**2 + dy**2) - r
    if kind == "square":
        return torch.maximum(ax, ay) - 0.8 * r  # 0.8: similar area to the circle
    if kind == "diamond":
        return (ax + ay - 1.15 * r) / math.sqrt(2)
    if kind == "ring":
        return (torch.sqrt(dx**2 + dy**2) - 0.75 * r).abs() - 0.25 * r
    if kind == "cross":
        arm = 0.3 * r
        return torch.minimum(torch.maximum(ax - r, ay - arm), torch.maximum(ax - arm, ay - r))
    if kind == "triangle":  # pointing up (image y grows downwards)
        c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
        edges = [dy - 0.5 * r, c * dx - s * dy - 0.5 * r, -c * dx - s * dy - 0.5 * r]
        return torch.stack(edges).amax(dim=0)
    raise ValueError(f"unknown shape {kind!r}")


def render_shape(kind: str, size: int, generator: torch.Generator) -> torch.Tensor:
    """One anti-aliased coloured shape on a coloured background, x_CHW in [-1, 1]."""
    u = torch.rand(8, generator=generator).tolist()
    r = size * (0.22 + 0.12 * u[0])
    margin = r + 1.0
    cx = margin + (size - 2 * margin) * u[1]
    cy = margin + (size - 2 * margin) * u[2]
    # Foreground and background hues are at least a third of the colour wheel apart, and
    # their brightness differs, so every shape is visible.
    fg = _hsv_to_rgb(u[3], 0.6 + 0.4 * u[4], 0.85)
    bg = _hsv_to_rgb((u[3] + 1 / 3 + u[5] / 3) % 1.0, 0.3 + 0.4 * u[6], 0.15 + 0.25 * u[7])
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy, dx = torch.meshgrid(coords - cy, coords - cx, indexing="ij")
    coverage = (0.5 - _shape_sdf(kind, dx, dy, r)).clamp(0, 1)  # 1 px ramp: anti-aliasing
    image = bg[:, None, None] + (fg - bg)[:, None, None] * coverage
    return image * 2 - 1


def _hsv_to_rgb(h: float, s: float, v: float) -> torch.Tensor:
    k = torch.tensor([5.0, 3.0, 1.0])
    k = (k + h * 6) % 6
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


class ShapesDataset:
    """Procedurally generated class-labelled shapes: item i = {image, label}, pure in (seed, i)."""

    def __init__(self, num_samples: int, image_size: int, num_classes: int, seed: int = 0):
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"model.num_classes: the shapes data set has 1..{len(SHAPES)} classes, got {num_classes}")
        if image_size < 8:
            raise ValueError(f"data.image_size: {image_size} is too small for the shapes data set; use >= 8")
        self.num_samples, self.image_size, self.num_classes, self.seed = num_samples, image_size, num_classes, seed
        self.labelled = True

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        label = i % self.num_classes
        image = render_shape(SHAPES[label], self.image_size, seeded_generator("shapes", self.seed, i))
        return {"image": image, "label": torch.tensor(label, dtype=torch.int64)}


class ImageFolderDataset:
    """root/<class>/*.png|jpg -> labelled (classes in sorted folder order); root/*.png -> unlabelled."""

    def __init__(self, root: str | Path, image_size: int, channels: int = 3):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data.path: {str(root)!r} is not a folder")
        self.image_size, self.channels = image_size, channels
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files: list[tuple[Path, int]] = []
        for index, folder in enumerate(class_dirs):
            files += [(p, index) for p in images_in(folder)]
        loose = images_in(root)
        if files and loose:
            raise ValueError(
                f"data.path: {str(root)!r} holds both class sub-folders and loose images; use one layout "
                "(root/<class>/*.png for labelled data, root/*.png for unlabelled)"
            )
        self.labelled = bool(files)
        self.classes = [p.name for p in class_dirs if any(True for _ in images_in(p))] if files else []
        if not files:
            files = [(p, 0) for p in loose]
        if not files:
            raise ValueError(
                f"data.path: no PNG/JPEG images in {str(root)!r} (looked for {', '.join(IMAGE_SUFFIXES)} directly "
                "inside it and in its class sub-folders)"
            )
        self.files = files
        self.num_classes = len(class_dirs) if self.labelled else 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        path, label = self.files[int(i)]
        with Image.open(path) as img:
            img = img.convert("RGB" if self.channels == 3 else "L")
            side = min(img.size)
            left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize(
                (self.image_size, self.image_size), Image.Resampling.BICUBIC
            )
            array = np.asarray(img, dtype=np.float32)
        array = array[..., None] if array.ndim == 2 else array
        image = torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1
        return {"image": image.contiguous(), "label": torch.tensor(label, dtype=torch.int64)}


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class ImageDataConfig:
    """The `data` section of an image recipe."""

    source: Literal["shapes", "folder"] = opt(
        "shapes", "Bundled procedural shapes, or a user image folder (data.path)."
    )
    path: str = opt("", "Image folder: root/<class>/*.png (labelled) or root/*.png.")
    num_samples: int = opt(100_000, "Size of the procedural shapes data set (items are generated on the fly).")
    shapes_seed: int = opt(0, "Seed of the shapes data set (independent of job.seed, so it is the same data).")
    num_workers: int = opt(0, "Background loader processes.")


def image_dataset(cfg: Any) -> Any:
    """The images {image, label} of `cfg.data`, sized by cfg.model.image_size (and in_channels)."""
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


class ImagesWithNoise:
    """item i = {image, noise}: the base data set's image i and N(0, I) noise of `noise_shape` seeded by
    (stream, seed, i), so a model that samples noise in its step (a VAE's reparameterisation, a denoising
    autoencoder's corruption) draws the same numbers under every layout."""

    def __init__(self, base: Any, seed: int, noise_shape: tuple[int, ...], stream: str):
        self.base, self.seed, self.noise_shape, self.stream = base, seed, noise_shape, stream

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        noise = torch.randn(self.noise_shape, generator=seeded_generator(self.stream, self.seed, int(i)))
        return {"image": self.base[int(i)]["image"], "noise": noise}


def images_with_noise_example(cfg: Any, batch_size: int, noise_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A meta-device batch shaped like ImagesWithNoise's (for FLOP counting and the planner)."""
    m = cfg.model
    return {
        "image": torch.empty(batch_size, m.in_channels, m.image_size, m.image_size, device="meta"),
        "noise": torch.empty(batch_size, *noise_shape, device="meta"),
    }
