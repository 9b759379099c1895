"""Bad input fails early with a message naming the field; train -> checkpoint -> `scaletrain sample` -> PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaletrain.config import load_config
from scaletrain.recipes.diffusion.sample_cli import make_sample_command
from scaletrain.validate import validate_config

ROOT = Path(__file__).resolve().parents[2]
DIT = str(ROOT / "scaletrain/recipes/diffusion/configs/dit-tiny.yaml")
UNET = str(ROOT / "scaletrain/recipes/diffusion/configs/unet-tiny.yaml")


def _validate(config: str, *overrides: str, world_size: int = 1) -> None:
    validate_config(load_config(config, list(overrides)), world_size)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


@pytest.mark.parametrize("interval", [300, 0])
def test_startup_names_the_eval_feature_extractor_when_evaluating(interval):
    import torch

    from scaletrain.recipes.diffusion.dit import DiT
    from scaletrain.registry import get_recipe

    cfg = load_config(DIT, ["--eval.interval", str(interval)])
    with torch.device("meta"):
        model = DiT(cfg.model)
    notes = get_recipe("dit").model.startup_notes(model, cfg, validate_config(cfg, 1))
    shapes_keys = "fid_shapes/kid_shapes/class_accuracy_shapes/diversity_shapes"
    named = [n for n in notes if n.startswith(f"eval features: {shapes_keys}: ")]
    assert len(named) == (1 if interval else 0), notes
    assert notes[0].startswith("kernels: attention "), notes


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match=r"model.image_size: 30 is not divisible by model.patch_size=4"):
        _validate(DIT, "--model.image_size", "30", "--model.patch_size", "4")


def test_unet_image_size_not_divisible_by_downsampling_and_no_tp():
    with pytest.raises(ValueError, match=r"model.image_size: 30 is not divisible by 4"):
        _validate(UNET, "--model.image_size", "30")
    with pytest.raises(ValueError, match=r"parallel.tp: recipe 'unet' has no tensor-parallel plan"):
        _validate(UNET, "--parallel.tp", "2", world_size=2)


@pytest.mark.parametrize("config", ["dit-tiny", "unet-tiny", "vae-tiny"])
def test_fused_cross_entropy_is_refused_without_a_cross_entropy(config):  # noqa: ANN001
    # The switch exists in every job config; a family with no cross-entropy must say it does nothing there.
    with pytest.raises(ValueError, match=r"train.fused_cross_entropy: recipe '\w+' has no cross-entropy"):
        config_path = str(ROOT / f"scaletrain/recipes/diffusion/configs/{config}.yaml")
        _validate(config_path, "--train.fused_cross_entropy", "true")


def test_tp_must_divide_heads():
    with pytest.raises(ValueError, match=r"parallel.tp: 8 does not divide model.n_heads=4"):
        _validate(DIT, "--parallel.tp", "8", world_size=8)


def test_class_conditioning_on_unlabelled_folder(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    with pytest.raises(ValueError, match=r"model.num_classes: class conditioning .* needs labelled data"):
        _validate(DIT, "--data.source", "folder", "--data.path", str(tmp_path / "imgs"))
    _validate(DIT, "--data.source", "folder", "--data.path", str(tmp_path / "imgs"), "--model.num_classes", "0")


def test_empty_image_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.path: no PNG/JPEG images"):
        _validate(DIT, "--data.source", "folder", "--data.path", str(tmp_path / "empty"))


def test_shapes_limits_and_flow_prediction():
    with pytest.raises(ValueError, match=r"model.num_classes: the shapes data set has 6 classes"):
        _validate(DIT, "--model.num_classes", "7")
    with pytest.raises(ValueError, match=r"prediction=v"):
        _validate(DIT, "--model.schedule", "flow", "--model.prediction", "eps")


def test_sampling_a_checkpoint_of_another_recipe(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "trainer.json").write_text(json.dumps({"step": 1, "recipe": "gpt"}))
    with pytest.raises(ValueError, match=r"checkpoint of recipe 'gpt', not 'dit'"):
        make_sample_command("dit")([str(folder), "--config", DIT])
    (folder / "trainer.json").write_text(json.dumps({"step": 1, "recipe": "dit"}))
    with pytest.raises(ValueError, match=r"is a 'unet' config"):
        make_sample_command("dit")([str(folder), "--config", UNET])
    with pytest.raises(ValueError, match="not a complete scaletrain checkpoint"):
        make_sample_command("dit")([str(tmp_path), "--config", DIT])


def test_train_then_sample_writes_a_png_grid(tmp_path):
    """Two training steps with EMA and an eval grid, then the sample command on the checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    small = ["--model.image_size", "16", "--model.dim", "32", "--model.depth", "1", "--model.n_heads", "2"]
    train = [sys.executable, "-m", "scaletrain.train", DIT, *small, "--train.steps", "2", "--train.warmup_steps", "1",
             "--train.global_batch_size", "4", "--eval.interval", "2", "--eval.num_samples", "6",
             "--model.eval_steps", "2", "--job.run_dir", str(tmp_path), "--job.name", "s"]  # fmt: skip
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list((tmp_path / "s" / "tb").iterdir())  # the eval grid went to TensorBoard
    png = tmp_path / "s" / "samples" / "step-00000002.png"  # ...and to a PNG beside the checkpoints
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = tmp_path / "s" / "checkpoints" / "step-00000002"
    out = tmp_path / "grid.png"
    sample = [sys.executable, "-m", "scaletrain.cli", "sample", str(ckpt), "--config", DIT, *small, "--metrics",
              "--sampler", "ddim", "--steps", "3", "--cfg", "4.0", "--class", "3", "--n", "10",
              "--out", str(out)]  # fmt: skip
    done = subprocess.run(sample, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "images/s" in done.stdout
    # --metrics: FID/KID against real shapes, labelled with the extractor that made them.
    keys = ("fid_shapes", "kid_shapes", "class_accuracy_shapes", "diversity_shapes")
    assert f"features: {'/'.join(keys)}: shapes classifier (trained by this project" in done.stdout
    assert all(f"\n{key}: " in done.stdout for key in keys)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 18 + 2, 8 * 18 + 2, 3)  # 10 images of 16 px, 8 per row, 2 px gaps
    if "config" in json.loads((ckpt / "trainer.json").read_text()):  # cores that store the resolved config
        plain = [
            sys.executable,
            "-m",
            "scaletrain.cli",
            "sample",
            str(ckpt),
            "--n",
            "3",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
        done = subprocess.run(plain, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        assert np.asarray(Image.open(out)).shape == (18 + 2, 3 * 18 + 2, 3)
    bad = [*sample[:-8], "--class", "9", "--out", str(out)]
    done = subprocess.run(bad, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2 and "--class: 9 is not a class of this model" in done.stderr
