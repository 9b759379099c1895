"""`scaletrain bench` on a diffusion config reports training samples/s (= images/s) and, through
the recipe's `sample.benchmark` hook, sampling images/s for DDIM with model.eval_steps steps."""

from __future__ import annotations

from pathlib import Path

from scaletrain.bench import bench
from scaletrain.config import load_config
from scaletrain.registry import get_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_sampling_images_per_second(tmp_path):
    small = ["--model.image_size", "16", "--model.dim", "32", "--model.depth", "1", "--model.n_heads", "2",
             "--train.global_batch_size", "4", "--eval.num_samples", "6", "--model.eval_steps", "3",
             "--model.eval_guidance", "2.0", "--job.run_dir", str(tmp_path)]  # fmt: skip
    cfg = load_config(str(ROOT / "scaletrain/recipes/diffusion/configs/dit-tiny.yaml"), small)
    result = bench(cfg, steps=1, warmup=1, rounds=1)
    assert result.unit == "samples" and result.scaletrain_rate > 0
    (what, rate, unit), *rest = result.recipe_rows
    assert not rest and unit == "images" and rate > 0
    assert what == "sampling ddim 3 steps (6 NFE/image), guidance 2, batch 6"
    assert f"{what}: {rate:.2f} images/s" in result.report()


def test_the_vae_has_no_sampling_benchmark():
    # The hook is optional: recipes without a sampler (the VAE) add no rows.
    assert getattr(get_recipe("vae").evaluation.sample, "benchmark", None) is None
    assert callable(get_recipe("unet").evaluation.sample.benchmark)
