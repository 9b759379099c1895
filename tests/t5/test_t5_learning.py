"""The T5 recipe learns its procedural task (CPU, one process; -m slow).

Runs the shipped t5-tiny config and reads the held-out greedy exact match and BLEU that the evaluation logs.
Observed numbers (2 shared CPU cores, torch 2.13) are in the docstring; the bound sits between them and what
an untrained model scores (exact match 0, BLEU 0.004).
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
@pytest.mark.timeout(3600)  # about 1 min on 2 free cores, but 25 min was seen when other jobs shared them
def test_t5_tiny_learns_its_task(tmp_path):
    """t5-tiny as shipped: sort 3-10 space-separated letters, 400 steps of batch 32 (0.3 s a step on 2 free
    cores, about 2 min; 25 min when other jobs shared them). Observed on 200 held-out examples, greedy:
    exact match 0.295 and BLEU 60.1 at step 200, exact match 0.43 and BLEU 79.0 at step 400 (loss 0.197;
    4 beams: 0.43, 79.5). Typical misses drop one of a repeated letter ('z a m a k' -> 'a k m z').
    Untrained (the init): exact match 0, BLEU 0.004."""
    rows = train(tmp_path, "t5")
    exact, bleu = last(rows, "eval/exact_match"), last(rows, "eval/bleu")
    print(f"t5-tiny: held-out exact match {exact:.3f}, BLEU {bleu:.1f}")
    assert exact > 0.3 and bleu > 65, (exact, bleu)
