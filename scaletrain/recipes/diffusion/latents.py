"""Latent cache for latent diffusion: encode a data set with a trained VAE once, sharded across ranks.

  torchrun --nproc-per-node 8 -m scaletrain.recipes.diffusion.latents runs/vae-tiny/checkpoints/step-00002000 \
      --config scaletrain/recipes/diffusion/configs/vae-tiny.yaml --out runs/vae-tiny/latents
  (one process: python -m scaletrain.recipes.diffusion.latents ...)

Rank r of W encodes the contiguous index range [r*N/W, (r+1)*N/W) of the VAE's training data
set (data section of --config; overrides like --data.source folder --data.path DIR work) and
writes shard-<r>.npz-style .npy files; rank 0 then writes index.json with the shard table,
the latent shape, the VAE checkpoint + config, and the scale factor 1/std(latents) (computed
over all ranks) that makes the DiT's inputs unit-variance, like Stable Diffusion's 0.18215.

`LatentDataset` reads the cache (memory-mapped): item i = {latent, label}, with the latent a
draw from q(z | x_i) seeded by (seed, i) and multiplied by the scale factor — a pure
function of i, as the core's loader requires.

Shape legend: N items, Z latent channels, h/w latent height/width.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from scaletrain.config import MissingDataError

INDEX = "index.json"


def encode_dataset(ckpt: Path, config: str | None, out: Path, overrides: list[str], batch: int = 64) -> dict:
    """Collective over all ranks of an initialised process group; returns the index (on every rank)."""
    from scaletrain.checkpoint.loading import load_job_config, load_model
    from scaletrain.images.datasets import image_dataset

    cfg = load_job_config(ckpt, "vae", config, overrides)
    dataset = image_dataset(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    n = len(dataset)
    start, stop = rank * n // world, (rank + 1) * n // world
    model = load_model(ckpt, "vae", cfg, ema="auto")
    device = next(model.parameters()).device
    means, logvars, labels = [], [], []
    with torch.no_grad():
        for lo in range(start, stop, batch):
            items = [dataset[i] for i in range(lo, min(lo + batch, stop))]
            x = torch.stack([it["image"] for it in items]).to(device)
            mean, logvar = model.encode(x)
            means.append(mean.float().cpu())
            logvars.append(logvar.float().cpu())
            labels += [int(it["label"]) for it in items]
    z = cfg.model.latent_channels
    d = cfg.model.image_size // cfg.model.downsample
    mean_N = torch.cat(means) if means else torch.zeros(0, z, d, d)
    logvar_N = torch.cat(logvars) if logvars else torch.zeros(0, z, d, d)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"mean-{rank:05d}.npy", mean_N.numpy())
    np.save(out / f"logvar-{rank:05d}.npy", logvar_N.numpy())
    np.save(out / f"label-{rank:05d}.npy", np.asarray(labels, dtype=np.int64))
    # Global std of posterior samples: E[mean^2 + var] - E[mean]^2 over all ranks.
    stats = torch.tensor(
        [mean_N.sum().item(), (mean_N.square() + logvar_N.exp()).sum().item(), float(mean_N.numel())],
        dtype=torch.float64,
    )
    dist.all_reduce(stats)
    mu = stats[0] / stats[2]
    std = float((stats[1] / stats[2] - mu.square()).sqrt())
    index = {
        "version": 1,
        "num_items": n,
        "shards": [
            {"rank": r, "start": r * n // world, "count": (r + 1) * n // world - r * n // world} for r in range(world)
        ],  # fmt: skip
        "latent_shape": [z, d, d],
        "scale_factor": 1.0 / std,
        "labelled": bool(getattr(dataset, "labelled", False)),
        "num_classes": int(getattr(dataset, "num_classes", 0)),
        "vae_checkpoint": str(ckpt.resolve()),
        "vae_config": {"model": _asdict(cfg.model), "data": _asdict(cfg.data)},
    }
    dist.barrier()
    if rank == 0:
        tmp = out / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(out / INDEX)  # the cache is complete only once index.json exists
    dist.barrier()
    return index


def _asdict(section: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(section)


def read_index(path: str | Path) -> dict:
    index_path = Path(path) / INDEX
    if not index_path.is_file():
        raise MissingDataError(
            f"data.path: {str(path)!r} is not a latent cache (no {INDEX}); build one with "
            "`python -m scaletrain.recipes.diffusion.latents VAE_CHECKPOINT --config VAE_YAML --out DIR`"
        )
    return json.loads(index_path.read_text())


class LatentDataset:
    """item i = {latent: scale * (mean + std * eps_i), label}, eps_i seeded by (seed, i)."""

    def __init__(self, path: str | Path, seed: int):
        self.path, self.seed = Path(path), seed
        self.index = read_index(path)
        self.scale = float(self.index["scale_factor"])
        self.labelled = self.index["labelled"]
        self.num_classes = self.index["num_classes"]
        self._arrays: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] | None = None

    def _shards(self) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        if self._arrays is None:  # opened lazily: loader workers each map the files themselves
            self._arrays = [
                (s["start"], *(np.load(self.path / f"{k}-{s['rank']:05d}.npy", mmap_mode="r")
                               for k in ("mean", "logvar", "label")))
                for s in self.index["shards"]
            ]  # fmt: skip
        return self._arrays

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return int(self.index["num_items"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from scaletrain.images.datasets import seeded_generator

        i = int(i)
        for start, mean, logvar, label in reversed(self._shards()):
            if i >= start:
                m, lv, y = mean[i - start], logvar[i - start], label[i - start]
                break
        eps = torch.randn(m.shape, generator=seeded_generator("vae-posterior", self.seed, i))
        z = torch.from_numpy(np.array(m)) + torch.exp(0.5 * torch.from_numpy(np.array(lv))) * eps
        return {"latent": z * self.scale, "label": torch.tensor(int(y), dtype=torch.int64)}


def check_latent_config(cfg: Any) -> None:
    """A latent DiT's model shape must match the cache (and be class-conditional only on labelled data)."""
    index = read_index(cfg.data.path)
    z, h, _ = index["latent_shape"]
    m = cfg.model
    if m.in_channels != z or m.image_size != h:
        raise ValueError(
            f"model.in_channels/model.image_size: the latent cache holds {z} x {h} x {h} latents; set "
            f"model.in_channels={z} and model.image_size={h} (got {m.in_channels} and {m.image_size})"
        )
    if m.num_classes > 0 and not index["labelled"]:
        raise ValueError(
            f"model.num_classes: class conditioning needs labelled data, but the latent cache {cfg.data.path!r} "
            "was built from unlabelled images; set model.num_classes=0"
        )
    if m.num_classes > 0 and index["num_classes"] > m.num_classes:
        raise ValueError(f"model.num_classes: the cache has {index['num_classes']} classes, got {m.num_classes}")


def load_cache_decoder(path: str | Path):
    """latents (scaled, as the DiT sees them) -> images in [-1, 1], via the cache's VAE (one process)."""
    from scaletrain.checkpoint.loading import load_model
    from scaletrain.config import load_config
    from scaletrain.config.loader import build_dataclass
    from scaletrain.registry import get_recipe

    index = read_index(path)
    cfg = load_config(None, {"recipe": "vae"})
    recipe = get_recipe("vae")
    cfg.model = build_dataclass(recipe.model.config, index["vae_config"]["model"], "model")
    cfg.data = build_dataclass(recipe.data.config, index["vae_config"]["data"], "data")
    vae = load_model(Path(index["vae_checkpoint"]), "vae", cfg)
    scale = float(index["scale_factor"])
    device = next(vae.parameters()).device

    @torch.no_grad()
    def decode(z_BZhw: torch.Tensor) -> torch.Tensor:
        return vae.decode(z_BZhw.to(device) / scale).float().cpu()

    return decode


def main(argv: list[str] | None = None) -> None:
    from scaletrain.distributed import destroy_distributed, init_distributed

    p = argparse.ArgumentParser(
        prog="python -m scaletrain.recipes.diffusion.latents", description=__doc__.split("\n")[0]
    )
    p.add_argument("checkpoint", help="VAE checkpoint folder")
    p.add_argument("--config", default=None, help="the VAE's training YAML (when the checkpoint has no config)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--batch", type=int, default=64)
    args, overrides = p.parse_known_args(argv)
    init_distributed("auto")
    try:
        index = encode_dataset(Path(args.checkpoint), args.config, Path(args.out), overrides, args.batch)
    finally:
        destroy_distributed()
    print(f"wrote {args.out}: {index['num_items']} latents {index['latent_shape']}, scale {index['scale_factor']:.4f}")


if __name__ == "__main__":
    from scaletrain.distributed import run_as_worker

    run_as_worker(main)  # torchrun workers leave without interpreter finalization
