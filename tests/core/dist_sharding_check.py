"""Run under torchrun (4 ranks): build the tiny GPT with FSDP2 and report, per rank, how much
of the model and optimizer state it holds and whether its weights equal a plain init.
Used by test_init.py; writes $SHARDING_OUT/rank<R>.json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scaletrain.config import load_config  # noqa: E402
from scaletrain.distributed import init_distributed, run_as_worker  # noqa: E402
from scaletrain.parallel import init_model  # noqa: E402
from scaletrain.recipes.gpt.model import GPT  # noqa: E402
from scaletrain.registry import get_recipe  # noqa: E402
from scaletrain.train import Trainer  # noqa: E402
from scaletrain.validate import validate_config  # noqa: E402


def pipeline_report() -> None:
    """pp=4: each rank must hold exactly its own stages' parameters (meta split, no full copy)."""
    cfg = load_config(
        REPO / "scaletrain/recipes/gpt/configs/tiny.yaml",
        ["--parallel.pp", "4", "--parallel.dp_shard", "1", "--train.steps", "1", "--train.warmup_steps", "0",
         "--model.n_layers", "6", "--train.global_batch_size", "8"],
    )  # fmt: skip
    dims = validate_config(cfg, 4)
    dataset = get_recipe("gpt").data.build_dataset(cfg)
    info = init_distributed()
    trainer = Trainer(cfg, dims, dataset, info.device)
    names = [n for part in trainer.model_parts for n, _ in part.named_parameters()]
    report = {
        "local_params": sum(p.numel() for p in trainer.model.parameters()),
        "total_params": sum(p.numel() for p in GPT(cfg.model).parameters()),
        "names": names,
    }
    trainer.train_step()
    Path(os.environ["SHARDING_OUT"], f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def main() -> None:
    if os.environ.get("SHARDING_MODE") == "pp":
        return pipeline_report()
    cfg = load_config(
        REPO / "scaletrain/recipes/gpt/configs/tiny.yaml",
        ["--parallel.dp_shard", "4", "--train.steps", "1", "--train.warmup_steps", "0"],
    )
    dims = validate_config(cfg, 4)
    dataset = get_recipe("gpt").data.build_dataset(cfg)
    info = init_distributed()
    trainer = Trainer(cfg, dims, dataset, info.device)
    plain = init_model(GPT(cfg.model), "cpu", cfg.job.seed)
    plain_params = dict(plain.named_parameters())
    matches = all(torch.equal(p.full_tensor(), plain_params[n]) for n, p in trainer.model.named_parameters())
    trainer.train_step()
    local_params = sum(p.to_local().numel() for p in trainer.model.parameters())
    local_state = sum(
        v.to_local().numel()
        for state in trainer.optimizer.state.values()
        for k, v in state.items()
        if k in ("exp_avg", "exp_avg_sq")
    )
    report = {
        "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "local_params": local_params,
        "local_optimizer_state": local_state,
        "matches_plain_init": matches,
    }
    Path(os.environ["SHARDING_OUT"], f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    # Leave like a torchrun worker of scaletrain.train: skip interpreter finalization, where
    # gloo's threads can abort the process after all results are written (a flake under load).
    run_as_worker(main)
