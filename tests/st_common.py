"""Constants shared by the core tests (a module with a unique name: every test folder has its own conftest)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "gpt" / "configs" / "tiny.yaml")

# Small enough for many multi-process runs on 2 cores, big enough that every layout's
# code path (GQA, several blocks, accumulation) is exercised.
FAST = [
    "--train.steps",
    "5",
    "--train.warmup_steps",
    "2",
    "--model.n_layers",
    "2",
    "--data.seq_len",
    "64",
    "--train.global_batch_size",
    "8",
]
