"""torchrun worker for tests/diffusion/test_eval_sharding.py: build the real Trainer for a layout,
run its evaluation once, and record what each rank did.

  torchrun --nproc-per-node 2 tests/diffusion/eval_shard_worker.py OUT_DIR CONFIG [overrides]

Writes OUT_DIR/rank-<r>.json ({"forward_samples": samples this rank pushed through the model,
"forwards": calls, "metrics": evaluate's result}) and, on rank 0, OUT_DIR/grid.pt (the images
rank 0 logged).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


class _Logger:
    def __init__(self) -> None:
        self.images: dict[str, torch.Tensor] = {}
        self.text: list[str] = []

    def log_image(self, step: int, tag: str, image: torch.Tensor) -> None:
        self.images[tag] = image

    def log_text(self, line: str) -> None:
        self.text.append(line)

    def log(self, step: int, metrics: dict) -> None:
        pass


def main() -> None:
    out, config, *overrides = sys.argv[1:]
    from scaletrain.config import load_config
    from scaletrain.distributed import destroy_distributed, init_distributed, world_size_from_env
    from scaletrain.registry import get_recipe
    from scaletrain.train import Trainer
    from scaletrain.validate import validate_config

    cfg = load_config(config, overrides)
    dims = validate_config(cfg, world_size_from_env())
    dataset = get_recipe(cfg.recipe).data.build_dataset(cfg)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    torch.set_num_threads(1)
    try:
        trainer = Trainer(cfg, dims, dataset, info.device)
        counts = {"forward_samples": 0, "forwards": 0}

        def count(module: torch.nn.Module, args: tuple) -> None:
            counts["forward_samples"] += int(args[0].shape[0])
            counts["forwards"] += 1

        trainer.model.register_forward_pre_hook(count)
        logger = _Logger()
        metrics = trainer.recipe.evaluation.evaluate(trainer.model, cfg, dims, 0, logger)
        Path(out).mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        (Path(out) / f"rank-{rank}.json").write_text(json.dumps({**counts, "metrics": metrics, "text": logger.text}))
        if rank == 0:
            torch.save(logger.images["samples"], Path(out) / "grid.pt")
        del trainer
    finally:
        destroy_distributed()


if __name__ == "__main__":
    from scaletrain.distributed import run_as_worker

    run_as_worker(main)  # skips interpreter teardown (gloo abort at exit), like scaletrain.train
