"""Pictures out of image models: class labels for a grid, the grid itself, and PNG files."""

from __future__ import annotations

import math

import torch


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
