"""torch.distributed's environment from Slurm's, for one process per Slurm task (srun).

Under `srun`, Slurm starts every rank itself, so nobody runs torchrun; each task derives
what torchrun would have set:
  MASTER_ADDR  first host of SLURM_JOB_NODELIST ("gpu[003-004,010],cpu1" -> "gpu003")
  MASTER_PORT  20000 + job id % 20000, so two jobs sharing a node do not collide
  RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / NODE_RANK
               SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NTASKS_PER_NODE / SLURM_NODEID

    env = torch_env_from_slurm(os.environ); os.environ.update(env)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from scaletrain.launchers.checks import LaunchError


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside [...]: "a[1-2,5],b" -> ["a[1-2,5]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist expression, keeping zero padding ("n[07-09]" -> "n07")."""
    entries = _split_top_level(nodelist.strip())
    if not entries:
        raise LaunchError(f"SLURM_JOB_NODELIST is empty ({nodelist!r})")
    entry = entries[0]
    # Each bracket group contributes its first value: "r[1-2]n[05-06]" -> "r1n05".
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)
    if not host or "[" in host or "]" in host:
        raise LaunchError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return host


def master_port(job_id: str | int) -> int:
    return 20000 + int(job_id) % 20000


def _get(environ: Mapping[str, str], name: str) -> str:
    if name not in environ:
        raise LaunchError(f"{name} is not set: run inside a Slurm allocation (sbatch/srun), one task per rank")
    return environ[name]


def _tasks_on_this_node(environ: Mapping[str, str]) -> int:
    # SLURM_TASKS_PER_NODE looks like "2(x3),1": the count for node NODEID.
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if spec is None:
        return int(_get(environ, "SLURM_NTASKS"))
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if match is None:
            raise LaunchError(f"cannot read SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = int(environ.get("SLURM_NODEID", "0"))
    return counts[min(node, len(counts) - 1)]


def torch_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed env:// variables for this Slurm task."""
    job_id = _get(environ, "SLURM_JOB_ID")
    return {
        "MASTER_ADDR": first_host(_get(environ, "SLURM_JOB_NODELIST")),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(master_port(job_id)),
        "RANK": _get(environ, "SLURM_PROCID"),
        "WORLD_SIZE": _get(environ, "SLURM_NTASKS"),
        "LOCAL_RANK": _get(environ, "SLURM_LOCALID"),
        "LOCAL_WORLD_SIZE": str(_tasks_on_this_node(environ)),
        "NODE_RANK": environ.get("SLURM_NODEID", "0"),
    }
