"""What the launcher tests share: the smallest training run, the child environment, reading a run's metrics.

(The live Slurm cluster fixture is in tests/launchers/conftest.py; helpers live here because a conftest is
for fixtures and hooks, not for importing.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "scaletrain" / "recipes" / "gpt" / "configs" / "tiny.yaml")

# The smallest run that still trains through every piece (3 optimizer steps, 2 data-parallel ranks).
TINY_RUN = [
    "--train.steps", "3", "--train.warmup_steps", "1", "--model.n_layers", "1",
    "--data.seq_len", "32", "--train.global_batch_size", "4", "--checkpoint.enable", "false",
    "--metrics.tensorboard", "false",
    # A rank that never meets the others fails in three minutes instead of the default ten (not one:
    # on a loaded 2-core machine a rank can spend a minute importing while the other waits).
    "--parallel.timeout_s", "180",
]


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ plus `extra` (tests/conftest.py already put this checkout first on PYTHONPATH, so children
    import launchers and scaletrain from it)."""
    return {**os.environ, **extra}


def logged_steps(run_dir: Path, name: str = "gpt-tiny") -> list[int]:
    """Steps in <run_dir>/<name>/metrics.jsonl, in file order ([] if the file is missing)."""
    path = Path(run_dir) / name / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def logged_losses(run_dir: Path, name: str = "gpt-tiny") -> list[float]:
    path = Path(run_dir) / name / "metrics.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if line.strip()]
