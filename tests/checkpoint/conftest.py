"""Checkpoint tests: make the folder's helpers (ckpt_harness, fault_worker) importable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_harness import torchrun  # noqa: E402


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    """layout -> (run dir, name, sample-id record) of an uninterrupted 10-step run (run once per session).

    Its checkpoints (steps 5 and 10) seed the reshard tests; its losses and sample ids are the
    references the resumed runs must reproduce.
    """
    cache: dict[str, tuple] = {}

    def get(layout: str) -> tuple:
        if layout not in cache:
            root = tmp_path_factory.mktemp(f"straight-{layout}")
            torchrun(layout, root, "run", record=root / "ids")
            cache[layout] = (root, "run", root / "ids")
        return cache[layout]

    return get
