"""Shared pieces for the launcher tests: the tiny run, reading metrics, a live Slurm cluster.

  pytest tests/launchers                 # everything (Slurm/netns/Ray parts skip with a reason if unavailable)
  pytest tests/launchers -m "not slow"   # without the requeue test
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "scaletrain" / "recipes" / "gpt" / "configs" / "tiny.yaml")
SETUP_SLURM = Path(__file__).resolve().parent / "setup_slurm.sh"

# The smallest run that still trains through every piece (3 optimizer steps, 2 data-parallel ranks).
TINY_RUN = [
    "--train.steps", "3", "--train.warmup_steps", "1", "--model.n_layers", "1",
    "--data.seq_len", "32", "--train.global_batch_size", "4", "--checkpoint.enable", "false",
    "--metrics.tensorboard", "false",
    # A rank that never meets the others fails in three minutes instead of the default ten (not one:
    # on a loaded 2-core machine a rank can spend a minute importing while the other waits).
    "--parallel.timeout_s", "180",
]

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ with this checkout first on PYTHONPATH (children import launchers and scaletrain from it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def logged_steps(run_dir: Path, name: str = "gpt-tiny") -> list[int]:
    """Steps in <run_dir>/<name>/metrics.jsonl, in file order ([] if the file is missing)."""
    path = Path(run_dir) / name / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def logged_losses(run_dir: Path, name: str = "gpt-tiny") -> list[float]:
    path = Path(run_dir) / name / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """A one-node Slurm cluster on this machine (munge + slurmctld + slurmd); yields slurm.conf.

    A cluster that was already up (CI started it, or you did with setup_slurm.sh) is reused and
    left running; one this fixture started is stopped at the end of the session.
    """
    missing = [b for b in ("sbatch", "scontrol", "slurmctld", "slurmd", "munged") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged for the test cluster needs root")
    etc = Path(os.environ.get("SCALETRAIN_SLURM_DIR", "/tmp/scaletrain-slurm"))
    proc = subprocess.run(["bash", str(SETUP_SLURM), str(etc)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"setup_slurm.sh failed:\n{proc.stdout}\n{proc.stderr}"
    conf = etc / "slurm.conf"
    # sbatch/scontrol (and submitit, which calls them) find the cluster through SLURM_CONF.
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
    if "already up" not in proc.stdout:
        subprocess.run(["bash", str(SETUP_SLURM), "--stop", str(etc)], capture_output=True, timeout=60)
