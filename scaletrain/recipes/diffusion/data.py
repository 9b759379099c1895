"""The diffusion recipes' training items: per-sample noise that makes every parallel layout see identical
batches, over the core's image data sets (scaletrain.images.datasets).

`DiffusionItems` wraps an image data set; item i = {x_t, t, y, target} where the noise, timestep and the
classifier-free-guidance label drop are drawn from a generator seeded by (seed, i) — per *global sample*,
never per rank, so DDP/FSDP/TP runs train on the same noisy inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from scaletrain.images.datasets import seeded_generator
from scaletrain.recipes.diffusion.process import Process


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
        g = seeded_generator("diffusion-noise", self.seed, i)
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
