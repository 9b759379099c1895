"""The T5 recipe learns its procedural task (CPU, one process; -m slow).

Runs the shipped t5-tiny config and reads the held-out greedy exact match and BLEU that the evaluation logs.
Observed numbers (2 shared CPU cores, torch 2.13) are in the docstring; the bound sits between them and what
an untrained model scores (exact match 0, BLEU ~2).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from st_common import REPO

CONFIG = REPO / "scaletrain" / "recipes" / "t5" / "configs" / "t5-tiny.yaml"


def train(tmp_path, name: str, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "scaletrain.train", str(CONFIG), "--checkpoint.enable", "false",
           "--metrics.tensorboard", "false", "--train.log_interval", "50", *overrides,
           "--job.run_dir", str(tmp_path), "--job.name", name]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def last(rows: list[dict], key: str) -> float:
    return [r[key] for r in rows if key in r][-1]


@pytest.mark.slow
def test_t5_tiny_learns_its_task(tmp_path):
    """PLACEHOLDER"""
    rows = train(tmp_path, "t5")
    exact, bleu = last(rows, "eval/exact_match"), last(rows, "eval/bleu")
    print(f"t5-tiny: held-out exact match {exact:.3f}, BLEU {bleu:.1f}")
    assert exact > 0.5 and bleu > 50, (exact, bleu)
