"""Helpers for the checkpoint tests: run training under torchrun (with faults), read results.

`torchrun(...)` launches tests/checkpoint/fault_worker.py, which is scaletrain.train plus the
fault injection and sample-id recording described in its docstring.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "scaletrain" / "recipes" / "gpt" / "configs" / "tiny.yaml")
WORKER = str(Path(__file__).with_name("fault_worker.py"))

# 10 steps, a checkpoint every 5: "10 straight vs 5 + resume 5".
STEPS = 10
BASE = [
    "--model.n_layers", "2",
    "--data.seq_len", "64",
    "--train.global_batch_size", "8",
    "--train.steps", str(STEPS),
    "--train.warmup_steps", "2",
    "--checkpoint.interval", "5",
    "--metrics.tensorboard", "false",
]  # fmt: skip

MOE = ["--model.moe.num_experts=4", "--model.moe.bias_update_rate=0.05"]
LAYOUTS = {
    "single": (1, []),
    "ddp2": (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]),
    "fsdp2": (2, ["--parallel.dp_shard", "2"]),
    "tp2": (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"]),
    "tp2xdp2": (4, ["--parallel.tp", "2", "--parallel.dp_shard", "2"]),
    "fsdp4": (4, ["--parallel.dp_shard", "4"]),
    "pp2": (2, ["--parallel.pp", "2", "--parallel.dp_shard", "1"]),  # one stage (layer) per rank
    "ds_zero2": (2, ["--engine.name", "deepspeed", "--engine.deepspeed.zero_stage", "2", "--parallel.dp_shard", "2"]),
    "ds_zero3": (2, ["--engine.name", "deepspeed", "--engine.deepspeed.zero_stage", "3", "--parallel.dp_shard", "2"]),
    "fairscale": (2, ["--engine.name", "fairscale", "--engine.fairscale.mode", "sharded_ddp", "--parallel.dp_shard=2"]),
    "megatron2": (2, ["--engine.name", "megatron", "--parallel.dp_shard=2"]),
    "megatron_tp2": (2, ["--engine.name", "megatron", "--parallel.tp", "2", "--parallel.dp_shard", "1"]),
    # fp16 with a loss scale of 2^24: steps 1-8 overflow and are skipped while the scale halves, so a resume at
    # step 5 must restore DeepSpeed's loss scaler to match the uninterrupted run.
    "ds_zero2_fp16": (2, ["--engine.name", "deepspeed", "--engine.deepspeed.zero_stage", "2", "--parallel.dp_shard=2",
                          "--train.dtype", "fp16", "--train.loss_scaler", "dynamic", "--engine.deepspeed.config",
                          str(Path(__file__).with_name("ds_fp16_overflowing.json"))]),
    # MoE: the routing biases (moved after every step from the summed loads) are checkpointed state too.
    "moe_fsdp2": (2, ["--parallel.dp_shard=2", *MOE]),
    "moe_single": (1, MOE),
    # Expert parallel: 2 experts per rank; with 4 ranks the experts are FSDP-sharded over the other 2.
    "moe_ep2": (2, ["--parallel.dp_shard=2", "--parallel.ep=2", *MOE]),
    "moe_ep2_fsdp4": (4, ["--parallel.dp_shard=4", "--parallel.ep=2", *MOE]),
    "moe_ep4": (4, ["--parallel.dp_shard=4", "--parallel.ep=4", *MOE]),
}


def torchrun(
    layout: str,
    run_dir: Path,
    name: str,
    *extra: str,
    faults: list[dict] | None = None,
    record: Path | None = None,
    starts: Path | None = None,
    rng: Path | None = None,
    restarts: int = 0,
    timeout: float = 300,
    check: bool = True,
    config: str = TINY,
    base: list[str] = BASE,
) -> subprocess.CompletedProcess:
    """Train `config` (the tiny GPT, with BASE's settings) under `layout` in <run_dir>/<name> (appending:
    resumes if checkpoints exist)."""
    nproc, overrides = LAYOUTS[layout]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [f"--max-restarts={restarts}", WORKER, config, *base, *overrides, *extra]
    cmd += ["--job.run_dir", str(run_dir), "--job.name", name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ST_FAULTS": json.dumps(faults or [])}
    env.pop("ST_RECORD", None)
    env.pop("ST_STARTS", None)
    env.pop("ST_RNG", None)
    if rng is not None:
        env["ST_RNG"] = str(rng)
    if record is not None:
        env["ST_RECORD"] = str(record)
    if starts is not None:
        env["ST_STARTS"] = str(starts)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{layout} run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def metrics(run_dir: Path, name: str) -> dict[int, dict]:
    """Rows of metrics.jsonl by step; a step logged twice (re-done after a restart) keeps the last."""
    rows: dict[int, dict] = {}
    for line in (run_dir / name / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return rows


def losses(run_dir: Path, name: str) -> list[float]:
    rows = metrics(run_dir, name)
    return [rows[s]["loss"] for s in sorted(rows)]


def recorded_ids(record: Path) -> dict[int, list[int]]:
    """Sample ids consumed per step over all ranks (sorted; last attempt of a re-done step)."""
    per_step: dict[int, dict[int, list[int]]] = {}
    for path in sorted(record.glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            row = json.loads(line)
            per_step.setdefault(row["step"], {})[rank] = row["ids"]
    return {step: sorted(i for ids in by_rank.values() for i in ids) for step, by_rank in sorted(per_step.items())}


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> Path:
    """Seed a new run folder with one checkpoint of another run (as if that run had moved)."""
    src = src_run / "checkpoints" / f"step-{step:08d}"
    dst = dst_run / "checkpoints" / src.name
    shutil.copytree(src, dst)
    return dst
