"""Regenerate tests/assets/golden_gpt_tiny_20steps.json, the golden loss curve of tests/core/test_train.py.

Run it only for a change that is meant to move the numbers (a new init, data order or optimizer rule), and
say so in the commit; the test itself never writes the file.

  python scripts/update_golden.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from scaletrain.config import load_config
from scaletrain.train import run

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "assets" / "golden_gpt_tiny_20steps.json"
CONFIG = "scaletrain/recipes/gpt/configs/tiny.yaml"
# The run tests/core/test_train.py::test_golden_loss_curve makes.
OVERRIDES = ["--train.steps", "20", "--checkpoint.enable", "false", "--metrics.tensorboard", "false"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        history = run(load_config(REPO / CONFIG, [*OVERRIDES, "--job.run_dir", tmp]))
    losses = [h["loss"] for h in history]
    GOLDEN.write_text(json.dumps({"config": f"{CONFIG} --train.steps 20", "loss": losses}, indent=1))
    print(f"wrote {GOLDEN}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
