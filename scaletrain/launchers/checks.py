"""Checks every launcher runs before it starts or submits anything.

A job that waits an hour in a Slurm queue and then dies on "world size 6 does not fit
tp=4" wastes the hour, so each launcher calls `check_launch` first; it loads the config
exactly as the trainer will (file < `--section.field` overrides) and checks the process
count against `cfg.parallel.degrees` for the world size the launch will produce.

    from scaletrain.launchers.checks import check_launch
    tiny = "scaletrain/recipes/gpt/configs/tiny.yaml"
    cfg = check_launch(tiny, ["--parallel.tp", "2"], num_nodes=1, nproc_per_node=2)
"""

from __future__ import annotations

import argparse
import math
import re
import socket
from pathlib import Path

from scaletrain.config import JobConfig, load_config
from scaletrain.validate import validate_config

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?$")


class LaunchError(ValueError):
    """A launch request that cannot work; the message names the value and the fix."""


def require(condition: bool, message: str) -> None:
    # Not `assert`: `python -O` strips asserts, and these are user errors.
    if not condition:
        raise LaunchError(message)


def check_counts(num_nodes: int, nproc_per_node: int) -> None:
    require(num_nodes >= 1, f"--nodes/--nnodes: {num_nodes} is not allowed; use >= 1")
    require(nproc_per_node >= 1, f"--nproc-per-node: {nproc_per_node} is not allowed; use >= 1")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port); IPv6 as '[::1]:29500'. Raises LaunchError on anything else."""
    hint = "expected HOST:PORT such as 10.0.0.1:29500 or node001:29500 (IPv6 as [::1]:29500)"
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", endpoint.strip())
    require(match is not None, f"--rdzv-endpoint: {endpoint!r} is not a valid endpoint; {hint}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    require(match.group(1) is not None or bool(_HOST_RE.match(host)), f"--rdzv-endpoint: bad host {host!r}; {hint}")
    require(1 <= port <= 65535, f"--rdzv-endpoint: port {port} is outside 1..65535; {hint}")
    return host, port


def ranks_needed(degrees: dict[str, int]) -> tuple[int, bool]:
    """(product of the fixed degrees, whether dp_shard=-1 fills the rest of the world)."""
    fills = degrees["dp_shard"] == -1
    fixed = math.prod(v for axis, v in degrees.items() if not (axis == "dp_shard" and fills))
    return fixed, fills


def check_world(cfg: JobConfig, num_nodes: int, nproc_per_node: int) -> None:
    world = num_nodes * nproc_per_node
    degrees = cfg.parallel.degrees
    fixed, fills = ranks_needed(degrees)
    shown = " x ".join(f"{axis}={value}" for axis, value in degrees.items() if not (axis == "dp_shard" and fills))
    layout = f"{num_nodes} node(s) x {nproc_per_node} process(es) = world size {world}"
    if fills:
        require(
            world % fixed == 0,
            f"{layout} is not a multiple of the parallel degrees {shown} = {fixed} (dp_shard=-1 fills the rest); "
            f"launch a multiple of {fixed} processes, or change the degrees with --parallel.<axis> overrides",
        )
    else:
        require(
            world == fixed,
            f"{layout} does not equal the parallel degrees {shown} = {fixed}; launch exactly {fixed} processes, "
            "or set --parallel.dp_shard -1 so data parallelism fills the rest",
        )


def load_checked_config(config: str | Path, overrides: list[str]) -> JobConfig:
    path = Path(config)
    require(path.is_file(), f"config file not found: {str(path)!r} (cwd {Path.cwd()}); pass a YAML file path")
    try:
        return load_config(str(path), list(overrides))
    except ValueError as exc:
        raise LaunchError(f"config {str(path)!r}: {exc}") from exc


# CPU cores asked for each GPU rank when --cpus-per-task is not given: its data-loader workers and host-side
# work want several (8 x 8 GPUs = 64 of a GPU node's cores). A CPU rank gets one; its threads are the compute.
CPUS_PER_GPU_RANK = 8


def add_slurm_arguments(parser: argparse.ArgumentParser, ranks_are: str, cores_per_task_are: str) -> None:
    """The flags both Slurm launchers (sbatch, submitit) take: the config and what to ask Slurm for."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--nodes", "--nnodes", dest="nodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--nproc-per-node", type=int, default=1, help=f"ranks ({ranks_are}) per node")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node: --nproc-per-node (default) or 0 for CPU ranks (the default with parallel.backend=gloo)",
    )
    parser.add_argument("--cpus-per-task", type=int, default=None, help=cores_per_task_are)
    parser.add_argument("--mem-gb", type=float, default=0.0, help="memory per node in GB (0 = cluster default)")
    parser.add_argument("--time-min", type=int, default=60, help="time limit in minutes")
    parser.add_argument("--partition", default=None, help="Slurm partition")


def slurm_resources(
    cfg: JobConfig, nproc_per_node: int, gpus_per_node: int | None, cpus_per_rank: int | None
) -> tuple[int, int]:
    """(GPUs per node, CPU cores per rank), checked, with the defaults filled in: one GPU per rank unless the
    config runs on CPU (parallel.backend=gloo); cores per rank as CPUS_PER_GPU_RANK above."""
    if gpus_per_node is None:
        gpus_per_node = 0 if cfg.parallel.backend == "gloo" else nproc_per_node
    if cpus_per_rank is None:
        cpus_per_rank = CPUS_PER_GPU_RANK if gpus_per_node else 1
    require(gpus_per_node >= 0, f"--gpus-per-node: {gpus_per_node} is not allowed; use >= 0")
    require(cpus_per_rank >= 1, f"--cpus-per-task: {cpus_per_rank} is not allowed; use >= 1")
    require(
        gpus_per_node == 0 or gpus_per_node == nproc_per_node,
        f"--gpus-per-node {gpus_per_node} with --nproc-per-node {nproc_per_node}: one rank drives one GPU, "
        "so use the same number (or 0 for CPU ranks)",
    )
    return gpus_per_node, cpus_per_rank


def check_launch(config: str | Path, overrides: list[str], num_nodes: int, nproc_per_node: int) -> JobConfig:
    """Load the config and check it for `num_nodes * nproc_per_node` ranks; returns the config."""
    check_counts(num_nodes, nproc_per_node)
    cfg = load_checked_config(config, overrides)
    check_world(cfg, num_nodes, nproc_per_node)
    try:
        # The trainer's own cross-field checks (batch divisibility, recipe rules) for this world size.
        validate_config(cfg, num_nodes * nproc_per_node)
    except ValueError as exc:
        raise LaunchError(f"config {str(config)!r} at world size {num_nodes * nproc_per_node}: {exc}") from exc
    return cfg


def local_address_towards(host: str, port: int) -> str:
    """The address this machine uses to reach `host` (a UDP connect picks the route; nothing is sent)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        return sock.getsockname()[0]


def is_local_address(host: str) -> bool:
    """True when `host` resolves to an address of this machine (binding to it succeeds)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def plan_lines(cfg: JobConfig, world_size: int, memory_limit_gb: float | None) -> list[str]:
    """`scaletrain plan`'s prediction for the layout a launch would start: each pipeline rank's memory, and a
    warning when it exceeds `memory_limit_gb`. A layout the planner cannot simulate says why instead."""
    from scaletrain.plan.ranks import plan_memory

    dims = validate_config(cfg, world_size)
    try:
        ranks = plan_memory(cfg, dims)
    except ValueError as exc:
        return [f"plan: not predicted ({exc})"]
    lines = []
    for r in ranks:
        where = f"pp rank {r.pp_rank}" if len(ranks) > 1 else "each rank"
        lines.append(f"plan: {where} needs {r.total / 2**30:.3g} GiB (model state {r.state.total / 2**30:.3g}, "
                     f"activations {r.activations / 2**30:.3g}; scaletrain plan for the breakdown)")  # fmt: skip
        if memory_limit_gb is not None and r.total > memory_limit_gb * 2**30:
            lines.append(f"warning: {where} is predicted at {r.total / 2**30:.3g} GiB, over --memory-limit-gb "
                         f"{memory_limit_gb:g}: it would not fit")  # fmt: skip
    return lines
