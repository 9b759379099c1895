"""The launcher tests' live Slurm cluster (their shared helpers: tests/launch_common.py).

  pytest tests/launchers                 # everything (Slurm/netns/Ray parts skip with a reason if unavailable)
  pytest tests/launchers -m "not slow"   # without the requeue test
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SETUP_SLURM = Path(__file__).resolve().parent / "setup_slurm.sh"


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
    proc = subprocess.run(["bash", str(SETUP_SLURM), str(etc)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"setup_slurm.sh failed:\n{proc.stdout}\n{proc.stderr}"
    conf = etc / "slurm.conf"
    # sbatch/scontrol (and submitit, which calls them) find the cluster through SLURM_CONF.
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
    if "already up" not in proc.stdout:
        subprocess.run(["bash", str(SETUP_SLURM), "--stop", str(etc)], capture_output=True, timeout=60)
