"""Diffusion data: shapes and folders are pure functions of the index; noise is per global sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from scaletrain.data import ShardedLoader
from scaletrain.images.datasets import SHAPES, ImageFolderDataset, ShapesDataset, render_shape
from scaletrain.recipes.diffusion.data import DiffusionItems, auto_repeats
from scaletrain.recipes.diffusion.process import Process


def test_shapes_are_pure_functions_of_seed_and_index():
    a, b = ShapesDataset(100, 32, 6, seed=0), ShapesDataset(100, 32, 6, seed=0)
    for i in (0, 7, 99):
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["label"] == b[i]["label"]
    assert not torch.equal(a[0]["image"], a[6]["image"])  # same class, different drawing
    assert not torch.equal(a[0]["image"], ShapesDataset(100, 32, 6, seed=1)[0]["image"])
    labels = [int(a[i]["label"]) for i in range(60)]
    assert np.bincount(labels).tolist() == [10] * 6
    image = a[3]["image"]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
    assert ShapesDataset(10, 64, 4)[1]["image"].shape == (3, 64, 64)


def test_every_shape_differs_from_every_other_on_the_same_canvas():
    masks = {}
    for kind in SHAPES:
        img = render_shape(kind, 32, torch.Generator().manual_seed(0))
        masks[kind] = (img - img[:, :1, :1]).abs().sum(0) > 0.1  # pixels differing from the corner (background)
    for i, a in enumerate(SHAPES):
        assert masks[a].sum() > 20, a
        for b in SHAPES[i + 1 :]:
            assert (masks[a] ^ masks[b]).sum() > 10, (a, b)


def test_diffusion_items_are_deterministic_and_seed_dependent():
    base = ShapesDataset(50, 16, 3)
    p = Process("linear", "eps", 1000)
    items = DiffusionItems(base, p, seed=0, num_classes=3, class_dropout=0.1)
    again = DiffusionItems(ShapesDataset(50, 16, 3), p, seed=0, num_classes=3, class_dropout=0.1)
    for i in (0, 13):
        for key in ("x_t", "t", "y", "target"):
            assert torch.equal(items[i][key], again[i][key])
    other = DiffusionItems(base, p, seed=1, num_classes=3, class_dropout=0.1)
    assert not torch.equal(items[0]["target"], other[0]["target"])
    # x_t and target agree with the closed form for the drawn t: eps target, so x_t = a x0 + s eps.
    item = items[5]
    a, s = (c.float() for c in p.coefficients(item["t"]))
    assert torch.allclose(item["x_t"], a * base[5]["image"] + s * item["target"], atol=1e-5)


def test_label_dropout_rate_and_null_class():
    items = DiffusionItems(ShapesDataset(2000, 8, 4), Process("flow", "v"), seed=0, num_classes=4, class_dropout=0.2)
    ys = torch.stack([items[i]["y"] for i in range(2000)])
    dropped = (ys == 4).float().mean().item()
    assert 0.17 < dropped < 0.23  # binomial std 0.009
    kept = torch.nonzero(ys != 4).flatten()
    assert all(int(ys[i]) == int(i) % 4 for i in kept[:50])


@pytest.mark.parametrize(("dp", "micro"), [(2, 4), (4, 1)])
def test_batches_through_the_core_loader_do_not_depend_on_the_layout(dp, micro):
    items = DiffusionItems(
        ShapesDataset(64, 8, 3), Process("cosine", "v", 100), seed=3, num_classes=3, class_dropout=0.5
    )

    def global_step(dp_size: int, mb: int) -> torch.Tensor:
        loaders = [
            ShardedLoader(items, global_batch_size=8, micro_batch_size=mb, dp_rank=r, dp_size=dp_size, seed=3)
            for r in range(dp_size)
        ]
        return torch.cat([b["x_t"] for ld in loaders for b in ld.next_step()])

    assert torch.equal(global_step(1, 8), global_step(dp, micro))


def _write_png(path, color, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(path)


def test_image_folder_labelled_and_unlabelled(tmp_path):
    _write_png(tmp_path / "lab" / "b_cats" / "1.png", (255, 0, 0))
    _write_png(tmp_path / "lab" / "a_dogs" / "x.jpg", (0, 0, 255))
    _write_png(tmp_path / "lab" / "a_dogs" / "y.PNG", (0, 255, 0))
    ds = ImageFolderDataset(tmp_path / "lab", image_size=8)
    assert ds.labelled and ds.num_classes == 2 and len(ds) == 3
    assert [int(ds[i]["label"]) for i in range(3)] == [0, 0, 1]  # classes in sorted folder order
    red = ds[2]["image"]
    assert red.shape == (3, 8, 8)
    assert torch.allclose(red[0], torch.ones(8, 8)) and torch.allclose(red[1], -torch.ones(8, 8))

    _write_png(tmp_path / "flat" / "a.png", (10, 20, 30))
    flat = ImageFolderDataset(tmp_path / "flat", image_size=4)
    assert not flat.labelled and flat.num_classes == 0 and len(flat) == 1


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG/JPEG images"):
        ImageFolderDataset(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="is not a folder"):
        ImageFolderDataset(tmp_path / "missing", 8)
    _write_png(tmp_path / "mixed" / "c" / "a.png", (1, 2, 3))
    _write_png(tmp_path / "mixed" / "b.png", (1, 2, 3))
    with pytest.raises(ValueError, match="both class sub-folders and loose images"):
        ImageFolderDataset(tmp_path / "mixed", 8)


def test_auto_repeats():
    assert auto_repeats(10, 0) == 1000 and auto_repeats(10, 3) == 3
    assert auto_repeats(10_000_000, 0) == 1
