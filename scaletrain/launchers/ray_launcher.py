"""Run scaletrain with Ray Train: a `TorchTrainer` with N workers, each training in-process.

Runbook (`pip install "ray[train]"`):
  # a local Ray instance on this machine, 2 CPU workers
  scaletrain launch ray scaletrain/recipes/gpt/configs/tiny.yaml --nproc-per-node 2 --train.steps 5
  # an existing cluster (`ray start --head` on one node, `ray start --address HEAD:6379` on the others),
  # 2 nodes x 8 GPUs; config, run_dir and this checkout must be on a filesystem every node sees
  scaletrain launch ray scaletrain/recipes/gpt/configs/tiny.yaml --address HEAD:6379 \
      --nodes 2 --nproc-per-node 8 --gpus

How a run works: Ray places nodes x nproc-per-node workers (1 CPU, or 1 GPU with --gpus,
each), starts the process group itself (gloo on CPU; NCCL for GPU tensors plus gloo for the
CPU-side collectives scaletrain's checkpointing uses) and sets RANK/WORLD_SIZE/LOCAL_RANK/
MASTER_ADDR; scaletrain's `init_distributed` finds the group already up and uses it.
Ray places workers where resources are free, so "nodes" is a count of workers, not a
placement; one Ray worker = one rank.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from scaletrain.launchers import SOURCE_ROOT
from scaletrain.launchers.argv import run_launcher
from scaletrain.launchers.checks import LaunchError, check_launch
from scaletrain.launchers.inprocess import TrainJob, absolute_job, run_dir_of, train_in_process


def _worker(loop_config: dict[str, Any]) -> None:
    # Runs on every Ray worker after Ray Train has set up torch.distributed.
    train_in_process(TrainJob(loop_config["config"], list(loop_config["overrides"])))


def ray_init(address: str | None, num_workers: int) -> None:
    """Connect to `address`, or start a local Ray with enough logical CPUs for the workers."""
    import ray

    python_path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"env_vars": {"PYTHONPATH": python_path}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    # Ray starts its workers at niceness 15 (RAY_worker_niceness), so beside any other busy process the
    # training ranks get almost no CPU: 2 workers next to two busy loops did not finish 3 tiny steps in
    # 5 minutes. Here the workers are the job: normal priority, unless the user set the variable.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Logical CPUs, not cores: Ray's controller actor and the workers each reserve one, and a
    # 2-core machine must still run 2 workers (they share the cores, as torchrun's would).
    ray.init(num_cpus=max(os.cpu_count() or 1, num_workers + 1), include_dashboard=False, runtime_env=env)


def run(
    config: str,
    overrides: list[str],
    nodes: int = 1,
    nproc_per_node: int = 1,
    use_gpu: bool = False,
    address: str | None = None,
    storage: str | None = None,
) -> Any:
    """Check, start (or join) Ray, train on nodes x nproc_per_node ranks; returns Ray's Result (raises on failure)."""
    cfg = check_launch(config, overrides, nodes, nproc_per_node)
    num_workers = nodes * nproc_per_node
    job = absolute_job(config, overrides, cfg)
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as exc:
        raise LaunchError('the ray launcher needs Ray Train: pip install "ray[train]"') from exc

    ray_init(address, num_workers)
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"config": job.config, "overrides": job.overrides},
            # On GPUs scaletrain wants gloo beside NCCL (CPU-side collectives in checkpointing).
            torch_config=TorchConfig(backend="cuda:nccl,cpu:gloo" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
            run_config=RunConfig(name=cfg.job.name, storage_path=storage or str(run_dir_of(cfg) / "ray")),
        )
        return trainer.fit()
    finally:
        ray.shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--nodes", "--nnodes", dest="nodes", type=int, default=1, help="nodes (x nproc = workers)")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="workers (ranks) per node")
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker")
    parser.add_argument("--address", default=None, help="existing Ray cluster (HOST:6379 or 'auto'); default: local")
    parser.add_argument("--storage", default=None, help="Ray Train storage folder (default <run_dir>/<name>/ray)")


def run_args(ns: argparse.Namespace, overrides: list[str]) -> int:
    try:
        run(ns.config, overrides, ns.nodes, ns.nproc_per_node, ns.gpus, ns.address, ns.storage)
    except LaunchError:
        raise
    except Exception as exc:  # Ray wraps a worker's failure (TrainingFailedError); report it as an exit code
        print(f"scaletrain launch: ray run failed: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_launcher("scaletrain launch ray", add_arguments, run_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
