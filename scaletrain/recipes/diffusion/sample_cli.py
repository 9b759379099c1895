"""`scaletrain sample CHECKPOINT ...` for the diffusion recipes: a PNG grid from a checkpoint.

  scaletrain sample runs/dit-tiny/checkpoints/step-00000900 --sampler ddim --steps 50 \
      --cfg 4.0 --class 3 --n 64 --out grid.png
  scaletrain sample CKPT --n 1000 --metrics --inception-weights /data/pt_inception.pth   # + FID/KID

The model config comes from the checkpoint's trainer.json ("config") when the trainer stored
it, else from --config (the training YAML, plus any --section.field overrides). EMA weights are
used when the checkpoint has them (--ema no to use the raw weights). Runs in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from scaletrain.checkpoint.loading import load_job_config, load_model
from scaletrain.config.schema import JobConfig
from scaletrain.distributed import destroy_distributed, init_distributed


def _parser(recipe_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scaletrain sample", description=f"Sample a PNG grid from a {recipe_name} checkpoint."
    )
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step-XXXXXXXX)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="ddim steps (ddpm always uses all training steps)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim noise: 0 deterministic, 1 = ancestral")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--class", dest="label", type=int, default=None, help="class to draw (default: every class)")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--batch", type=int, default=64, help="images per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="output PNG")
    p.add_argument("--ema", choices=["auto", "yes", "no"], default="auto", help="use the EMA weights if present")
    p.add_argument("--config", default=None, help="training config YAML, when the checkpoint does not carry one")
    p.add_argument("--metrics", action="store_true", help="also print FID/KID against --n real images")
    p.add_argument(
        "--inception-weights",
        default=None,
        help="with --metrics: a local Inception-v3 state dict (replaces model.eval_inception_weights)",
    )
    return p


class SampleCommand:
    """`scaletrain sample` for one recipe (called with argv), plus the sampling benchmark that
    `scaletrain bench` runs through the registry (`recipe.evaluation.sample.benchmark`)."""

    def __init__(self, recipe_name: str):
        self.recipe_name = recipe_name

    def __call__(self, argv: list[str]) -> None:
        from scaletrain.images.grid import class_labels, image_grid, save_png
        from scaletrain.recipes.diffusion.recipe import generate, real_data_section

        args, overrides = _parser(self.recipe_name).parse_known_args(argv)
        folder = Path(args.checkpoint)
        cfg = load_job_config(folder, self.recipe_name, args.config, overrides)
        if args.n < 1:
            raise ValueError(f"--n: {args.n} is not allowed; use >= 1")
        if args.inception_weights is not None:
            from scaletrain.images.inception import check_weights_file

            check_weights_file(args.inception_weights)
            cfg.model.eval_inception_weights = args.inception_weights
        labels = class_labels(cfg.model.num_classes, args.n, args.label)
        init_distributed("auto")
        try:
            model = load_model(folder, self.recipe_name, cfg, args.ema)
            start = time.perf_counter()
            images = generate(
                model,
                cfg.model,
                labels,
                sampler=args.sampler,
                steps=args.steps,
                eta=args.eta,
                guidance=args.cfg,
                seed=args.seed,
                batch_size=args.batch,
                decode=_decoder(cfg),
            )
            seconds = time.perf_counter() - start
        finally:
            destroy_distributed()
        ncol = 8 if args.n >= 8 else args.n
        save_png(image_grid(images, ncol), args.out)
        print(f"wrote {args.out}: {args.n} images in {seconds:.1f}s ({args.n / seconds:.2f} images/s)")
        if args.metrics:
            from scaletrain.images.quality import feature_labels, sample_metrics

            for line in feature_labels(cfg, data=real_data_section(cfg)):
                print(f"features: {line}")
            for key, value in sample_metrics(cfg, images, labels, data=real_data_section(cfg)).items():
                print(f"{key}: {value:.6g}")

    @torch.no_grad()
    def benchmark(self, model: torch.nn.Module, cfg: JobConfig, rounds: int = 3) -> list[tuple[str, float, str]]:
        """Sampling throughput with the eval-grid settings: DDIM with model.eval_steps steps (and
        model.eval_guidance), eval.num_samples images per call, decoded for a latent model.
        One warm-up call, then the median of `rounds` timed calls. Returns (what, rate, unit) rows."""
        from scaletrain.images.grid import class_labels
        from scaletrain.recipes.diffusion.recipe import generate

        m = cfg.model
        n = cfg.eval.num_samples
        labels = class_labels(m.num_classes, n, None)
        decode = _decoder(cfg)

        def run() -> float:
            start = time.perf_counter()
            generate(model, m, labels, sampler="ddim", steps=m.eval_steps, guidance=m.eval_guidance,
                     seed=cfg.job.seed, batch_size=n, decode=decode)  # fmt: skip
            return time.perf_counter() - start  # generate returns CPU tensors: the device has finished

        run()
        seconds = statistics.median(run() for _ in range(max(1, rounds)))
        nfe = m.eval_steps * (2 if m.eval_guidance != 1.0 else 1)  # guidance doubles each forward's batch
        what = f"sampling ddim {m.eval_steps} steps ({nfe} NFE/image), guidance {m.eval_guidance:g}, batch {n}"
        return [(what + (" + VAE decode" if decode is not None else ""), n / seconds, "images")]


def _decoder(cfg: JobConfig) -> Any:
    if cfg.data.source != "latents":
        return None
    from scaletrain.recipes.diffusion.latents import load_cache_decoder

    return load_cache_decoder(cfg.data.path)


def make_sample_command(recipe_name: str) -> SampleCommand:
    return SampleCommand(recipe_name)
