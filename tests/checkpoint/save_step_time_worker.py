"""Train the tiny GPT in this (fresh) process, checkpoint once, and report how steps ran before and after:
median step time, voluntary context switches per step and the process's OS threads (JSON on stdout).
Run by test_save_step_time.py; argv: run_dir [checkpoint.async_mode]."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

from ckpt_harness import TINY

from scaletrain.config import load_config
from scaletrain.distributed import destroy_distributed, init_distributed
from scaletrain.registry import get_recipe
from scaletrain.train import Trainer
from scaletrain.validate import validate_config


def measure(trainer: Trainer, steps: int) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "median_s": statistics.median(seconds),
        "switches_per_step": (after.ru_nvcsw - before.ru_nvcsw) / steps,
        "threads": len(os.listdir("/proc/self/task")),
    }


def main(run_dir: str, async_mode: str = "none") -> None:
    overrides = ["--train.steps", "100", "--metrics.console", "false", "--metrics.tensorboard", "false"]
    overrides += ["--checkpoint.async_mode", async_mode, "--job.run_dir", run_dir]
    cfg = load_config(TINY, overrides)
    dims = validate_config(cfg, 1)
    dataset = get_recipe(cfg.recipe).data.build_dataset(cfg)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    try:
        trainer = Trainer(cfg, dims, dataset, info.device)
        measure(trainer, 5)  # warm-up
        before = measure(trainer, 25)
        trainer.save()
        trainer.checkpointer.finish()
        after = measure(trainer, 25)
        print(json.dumps({"before": before, "after": after}))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
