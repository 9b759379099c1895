"""Image data for the diffusion recipes: bundled procedural shapes, user image folders, and
the per-sample diffusion noise that makes every parallel layout see identical batches.

Every item is a pure function of its index (the core's loader owns order and sharding):
  - `ShapesDataset`: coloured shapes (circle, square, triangle, cross, ring, diamond) drawn
    with anti-aliased signed distances from a generator seeded by (seed, index). Class =
    shape = index % num_classes, so classes are balanced. Nothing is downloaded or stored.
  - `ImageFolderDataset`: root/<class>/*.png|jpg (labelled) or root/*.png|jpg (unlabelled),
    centre-cropped and resized to a square.
  - `DiffusionItems`: wraps either; item i = {x_t, t, y, target} where the noise, timestep and
    the classifier-free-guidance label drop are drawn from a generator seeded by (seed, i) —
    per *global sample*, never per rank, so DDP/FSDP/TP runs train on the same noisy inputs.

Images are float32 in [-1, 1], shape C x H x W (x_CHW).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaletrain.recipes.diffusion.process import Process

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def item_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple (hashed, so nearby tuples give unrelated streams)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: Any) -> torch.Generator:
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
        image = render_shape(SHAPES[label], self.image_size, _generator("shapes", self.seed, i))
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
            files += [(p, index) for p in _images_in(folder)]
        loose = _images_in(root)
        if files and loose:
            raise ValueError(
                f"data.path: {str(root)!r} holds both class sub-folders and loose images; use one layout "
                "(root/<class>/*.png for labelled data, root/*.png for unlabelled)"
            )
        self.labelled = bool(files)
        self.classes = [p.name for p in class_dirs if any(True for _ in _images_in(p))] if files else []
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


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class DiffusionItems:
    """Training items for a denoiser: item i = {x_t, t, y, target}, pure in (seed, i).

    `repeats` lists each base image that many times, each copy with its own noise, so a small
    folder is not trained on one fixed noise draw per image (index i -> image i % len(base)).
    """

    def __init__(
        self,
        base: Any,
        process: Process,
        seed: int,
        num_classes: int,
        class_dropout: float,
        repeats: int = 1,
        key: str = "image",
    ):
        self.base, self.process, self.seed = base, process, seed
        self.num_classes, self.class_dropout, self.repeats, self.key = num_classes, class_dropout, repeats, key

    def __len__(self) -> int:
        return len(self.base) * self.repeats

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        i = int(i)
        item = self.base[i % len(self.base)]
        x0 = item[self.key]
        g = _generator("diffusion-noise", self.seed, i)
        t = self.process.sample_time(g)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
        drop = bool(torch.rand((), generator=g) < self.class_dropout)
        if self.num_classes > 0:
            # The extra embedding row num_classes is the "null" class for guidance.
            y = self.num_classes if drop else int(item["label"])
        else:
            y = 0
        return {
            "x_t": self.process.q_sample(x0, t, eps),
            "t": self.process.model_time(t),
            "y": torch.tensor(y, dtype=torch.int64),
            "target": self.process.target(x0, t, eps).float(),
        }


def auto_repeats(num_images: int, requested: int) -> int:
    """Noise draws per image: as requested, or enough for ~4M items (the loader's permutation stays small)."""
    if requested > 0:
        return requested
    return max(1, min(1000, (1 << 22) // max(num_images, 1)))
