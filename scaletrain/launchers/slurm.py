"""Submit scaletrain to Slurm with submitit: one Slurm task per rank, no torchrun.

Runbook (`pip install submitit`):
  # 1 node, 2 CPU ranks, wait for the result
  scaletrain launch slurm scaletrain/recipes/gpt/configs/tiny.yaml --nodes 1 --nproc-per-node 2 --gpus-per-node 0 --wait
  # 4 nodes x 8 GPUs on partition "gpu", 2 hours
  scaletrain launch slurm scaletrain/recipes/gpt/configs/llama-8b.yaml --nodes 4 --nproc-per-node 8 \
      --gpus-per-node 8 --cpus-per-task 10 --partition gpu --time-min 120 --train.steps 5000

How a job runs: submitit pickles a `SlurmTrainTask` and asks for nodes x nproc-per-node
tasks; `srun` starts each one, the task turns SLURM_* into RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR (launchers.slurm_env) and trains in-process. On timeout or preemption submitit
calls `checkpoint()`, which requeues the same task; the trainer resumes from the newest
complete checkpoint in the run folder. Logs: <run_dir>/<name>/slurm/<job id>_<task>_log.{out,err}.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from scaletrain.launchers.inprocess import TrainJob, absolute_job, run_dir_of, train_in_process
from scaletrain.launchers.slurm_env import torch_env_from_slurm


class SlurmTrainTask:
    """The callable submitit runs on every task."""

    def __init__(self, job: TrainJob):
        self.job = job

    def __call__(self) -> None:
        os.environ.update(torch_env_from_slurm(os.environ))
        train_in_process(self.job)

    def checkpoint(self) -> Any:
        # submitit calls this on SIGUSR2 before a timeout/preemption and requeues what we return.
        # Resubmitting ourselves is enough: the trainer resumes from its newest complete checkpoint.
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmTrainTask(self.job))


@dataclass
class SlurmLaunch:
    config: str
    overrides: list[str]
    nodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int | None = None  # None: one per rank, or 0 when the config runs on gloo
    cpus_per_task: int | None = None  # per rank; None: CPUS_PER_GPU_RANK for GPU ranks, 1 for CPU ranks
    mem_gb: float = 0.0
    time_min: int = 60
    partition: str | None = None
    log_dir: str | None = None

    def check(self) -> Any:
        """Check everything and fill in the GPU and CPU defaults; returns the config."""
        require(self.time_min >= 1, f"--time-min: {self.time_min} is not allowed; use >= 1 (minutes)")
        cfg = check_launch(self.config, self.overrides, self.nodes, self.nproc_per_node)
        self.gpus_per_node, self.cpus_per_task = slurm_resources(
            cfg, self.nproc_per_node, self.gpus_per_node, self.cpus_per_task
        )
        return cfg


def make_executor(launch: SlurmLaunch, folder: Path) -> Any:
    try:
        import submitit
    except ImportError as exc:
        raise LaunchError("the slurm launcher needs submitit: pip install submitit") from exc
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params: dict[str, Any] = dict(
        name=f"scaletrain-{Path(launch.config).stem}",
        nodes=launch.nodes,
        tasks_per_node=launch.nproc_per_node,
        cpus_per_task=launch.cpus_per_task,
        timeout_min=launch.time_min,
        # The job imports `scaletrain` from this checkout, wherever it starts.
        slurm_setup=[f"export PYTHONPATH={SOURCE_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.mem_gb:
        params["mem_gb"] = launch.mem_gb
    if launch.partition:
        params["slurm_partition"] = launch.partition
    executor.update_parameters(**params)
    return executor


def submit(launch: SlurmLaunch) -> Any:
    """Check, then submit; returns the submitit Job."""
    cfg = launch.check()
    job = absolute_job(launch.config, launch.overrides, cfg)
    folder = Path(launch.log_dir) if launch.log_dir else run_dir_of(cfg) / "slurm"
    return make_executor(launch, folder.resolve()).submit(SlurmTrainTask(job))


def wait(job: Any) -> int:
    """Block until the job ends; 0 when every task succeeded."""
    try:
        job.results()
    except Exception as exc:  # submitit re-raises the task's failure (or a missing result) here
        print(f"scaletrain launch: slurm job {job.job_id} failed: {exc}", file=sys.stderr)
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_slurm_arguments(
        parser, "Slurm tasks", f"CPU cores per rank (default: {CPUS_PER_GPU_RANK} for a GPU rank, 1 for a CPU rank)"
    )
    parser.add_argument("--log-dir", default=None, help="submitit folder (default <run_dir>/<name>/slurm)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and return its status")


def run_args(ns: argparse.Namespace, overrides: list[str]) -> int:
    launch = SlurmLaunch(
        config=ns.config,
        overrides=overrides,
        nodes=ns.nodes,
        nproc_per_node=ns.nproc_per_node,
        gpus_per_node=ns.gpus_per_node,
        cpus_per_task=ns.cpus_per_task,
        mem_gb=ns.mem_gb,
        time_min=ns.time_min,
        partition=ns.partition,
        log_dir=ns.log_dir,
    )
    job = submit(launch)
    print(f"scaletrain launch: submitted slurm job {job.job_id} (logs in {job.paths.folder})", flush=True)
    return wait(job) if ns.wait else 0


def main(argv: list[str] | None = None) -> int:
    return run_launcher("scaletrain launch slurm", add_arguments, run_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
