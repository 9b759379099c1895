"""Render a `slurm/*.sbatch` template for a scaletrain run and submit it with `sbatch`.

Runbook:
  # print the script for 2 nodes x 8 GPUs, do not submit
  scaletrain launch sbatch scaletrain/recipes/gpt/configs/tiny.yaml --nodes 2 --nproc-per-node 8 --gpus-per-node 8 \
      --partition gpu --time-min 240 --dry-run --train.steps 10000
  # submit the requeue-on-preemption variant and print the job id
  scaletrain launch sbatch scaletrain/recipes/gpt/configs/tiny.yaml --nodes 2 --nproc-per-node 8 --gpus-per-node 8 \
      --requeue
  # submit and block until the job ends (exit code = the job's)
  scaletrain launch sbatch scaletrain/recipes/gpt/configs/tiny.yaml --nproc-per-node 2 --gpus-per-node 0 --wait

The rendered script is kept next to the job's log in <run_dir>/<name>/slurm/, so what
ran can always be read back. Templates use {{FIELD}} placeholders (not $VAR, which the
scripts' own shell variables use); a field left unfilled is an error, not a silent blank.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from scaletrain.launchers import SOURCE_ROOT
from scaletrain.launchers.argv import run_launcher
from scaletrain.launchers.checks import (
    CPUS_PER_GPU_RANK,
    LaunchError,
    add_slurm_arguments,
    check_launch,
    require,
    slurm_resources,
)
from scaletrain.launchers.inprocess import absolute_job, run_dir_of

TEMPLATES = {False: SOURCE_ROOT / "slurm" / "train.sbatch", True: SOURCE_ROOT / "slurm" / "train_requeue.sbatch"}
# Requeued jobs pass through REQUEUED/REQUEUE_HOLD before PENDING again: not finished.
ACTIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STAGE_OUT",
    "SIGNALING",
}
_FIELD = re.compile(r"\{\{([A-Z_]+)\}\}")


def render(template: str, values: dict[str, str]) -> str:
    """Fill every {{FIELD}}; a field without a value (or a value without a field) raises LaunchError.

    The script should read as if written by hand: `##` lines (notes about the template) are dropped, and so
    is a line holding only a field whose value is empty."""
    fields = set(_FIELD.findall(template))
    require(not fields - values.keys(), f"template fields without a value: {sorted(fields - values.keys())}")
    require(not values.keys() - fields, f"values for fields the template lacks: {sorted(values.keys() - fields)}")
    lines = []
    for line in template.splitlines():
        alone = _FIELD.fullmatch(line.strip())
        if line.startswith("##") or (alone and not values[alone.group(1)]):
            continue
        lines.append(_FIELD.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + ("\n" if template.endswith("\n") else "")


# The template's {{RESTART_STORE}} when torchrun may restart (docs/checkpoints.md), else nothing.
RESTART_STORE = """# With restarts, a fresh torchrun store per rendezvous round: a shared one keeps the dead
# group's keys and a restarted group can fail to connect.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"""


def extra_sbatch_lines(gpus_per_node: int, partition: str | None, mem_gb: float) -> str:
    lines = []
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if mem_gb:
        lines.append(f"#SBATCH --mem={int(mem_gb * 1024)}M")
    return "\n".join(lines)


def build_script(ns: argparse.Namespace, overrides: list[str]) -> tuple[str, Path]:
    """Check everything, then return (script text, log folder)."""
    require(ns.time_min >= 1, f"--time-min: {ns.time_min} is not allowed; use >= 1 (minutes)")
    require(ns.max_restarts >= 0, f"--max-restarts: {ns.max_restarts} is not allowed; use >= 0")
    require(
        ns.cpus_per_task is None or ns.cpus_per_task >= 1,
        f"--cpus-per-task: {ns.cpus_per_task} is not allowed; use >= 1",
    )
    cfg = check_launch(ns.config, overrides, ns.nodes, ns.nproc_per_node)
    # One task per node runs torchrun, so the task's cores are all its ranks' cores.
    gpus, cpus_per_rank = slurm_resources(cfg, ns.nproc_per_node, ns.gpus_per_node, None)
    cpus_per_task = ns.cpus_per_task or ns.nproc_per_node * cpus_per_rank
    job = absolute_job(ns.config, overrides, cfg)
    log_dir = run_dir_of(cfg) / "slurm"
    template = Path(ns.template) if ns.template else TEMPLATES[ns.requeue]
    require(template.is_file(), f"--template: {str(template)!r} not found")
    values = {
        "JOB_NAME": f"scaletrain-{cfg.job.name}",
        "NODES": str(ns.nodes),
        "NPROC_PER_NODE": str(ns.nproc_per_node),
        "CPUS_PER_TASK": str(cpus_per_task),
        "TIME_MIN": str(ns.time_min),
        "LOG_DIR": str(log_dir),
        "EXTRA_SBATCH": extra_sbatch_lines(gpus, ns.partition, ns.mem_gb),
        "REPO": shlex.quote(str(SOURCE_ROOT)),
        "PYTHON": shlex.quote(ns.python or sys.executable),
        "MAX_RESTARTS": str(ns.max_restarts),
        "RESTART_STORE": RESTART_STORE if ns.max_restarts else "",
        "TRAIN_ARGS": shlex.join(job.argv()),
    }
    return render(template.read_text(), values), log_dir


def submit(script: str, log_dir: Path) -> str:
    """Write the script beside the logs and `sbatch` it; returns the job id."""
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output folder
    path = log_dir / f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.sbatch"
    path.write_text(script)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise LaunchError("sbatch not found: run on a Slurm login node (or install slurm-wlm)") from exc
    if proc.returncode != 0:
        raise LaunchError(f"sbatch {path} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable prints "jobid" or "jobid;cluster"


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, ...); {} once Slurm forgot the job."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return {}
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def wait_for_job(job_id: str, timeout_s: float = float("inf"), poll_s: float = 1.0) -> int:
    """Poll until the job ends; its exit code (1 for a failed/cancelled job without one).

    Polling scontrol each second instead of `sbatch --wait`, whose back-off adds up to ~30 s.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        fields = job_fields(job_id)
        state = fields.get("JobState", "")
        if state and state not in ACTIVE_STATES:
            code = int(fields.get("ExitCode", "1:0").split(":")[0])
            return code if state == "COMPLETED" or code else 1
        if not fields:
            raise LaunchError(f"slurm job {job_id} is unknown to scontrol (finished longer ago than MinJobAge?)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"slurm job {job_id} still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_slurm_arguments(
        parser, "GPUs", f"CPU cores for each node's task (default: {CPUS_PER_GPU_RANK} per GPU rank, 1 per CPU rank)"
    )
    parser.add_argument("--max-restarts", type=int, default=0, help="torchrun worker-group restarts")
    parser.add_argument("--requeue", action="store_true", help="use the requeue-on-preemption template")
    parser.add_argument("--template", default=None, help="your own template with the same {{FIELDS}}")
    parser.add_argument("--python", default=None, help="python on the compute nodes (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    parser.add_argument("--wait", action="store_true", help="block until the job ends; exit with its code")


def run_args(ns: argparse.Namespace, overrides: list[str]) -> int:
    script, log_dir = build_script(ns, overrides)
    if ns.dry_run:
        print(script)
        return 0
    job_id = submit(script, log_dir)
    print(f"scaletrain launch: submitted slurm job {job_id} (log {log_dir}/{job_id}.out)", flush=True)
    return wait_for_job(job_id) if ns.wait else 0


def main(argv: list[str] | None = None) -> int:
    return run_launcher("scaletrain launch sbatch", add_arguments, run_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
