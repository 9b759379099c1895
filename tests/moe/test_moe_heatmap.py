"""The evaluation's per-block x per-expert load heatmap: the colours, and the PNG a run writes (one process,
and two pipeline stages that each hold some of the MoE blocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from st_common import REPO

from scaletrain.recipes.gpt.moe import load_heatmap

CONFIG = str(REPO / "scaletrain" / "recipes" / "gpt" / "configs" / "tiny-moe.yaml")
CELL = 12


def test_heatmap_is_white_at_the_mean_red_above_blue_below():
    # Block 1: even. Block 4: expert 0 takes twice the mean, expert 1 none, experts 2 and 3 the mean.
    image = load_heatmap({4: torch.tensor([8.0, 0.0, 4.0, 4.0]), 1: torch.tensor([3.0, 3.0, 3.0, 3.0])}, cell=CELL)
    assert image.shape == (2 * CELL, 4 * CELL, 3) and image.dtype == torch.uint8
    centre = CELL // 2
    pixel = {(r, c): image[r * CELL + centre, c * CELL + centre].tolist() for r in (0, 1) for c in range(4)}
    assert all(pixel[0, col] == [255, 255, 255] for col in range(4))  # rows in block order: block 1 first
    assert pixel[1, 0] == [255, 0, 0] and pixel[1, 1] == [0, 0, 255] and pixel[1, 2] == [255, 255, 255]


@pytest.mark.parametrize(
    ("layout", "nproc"),
    [([], 1), (["--parallel.pp", "2", "--parallel.dp_shard", "1", "--model.moe.aux_loss_coef", "0"], 2)],
    ids=["single", "pp2"],
)
def test_eval_writes_the_load_heatmap(layout, nproc, tmp_path):
    overrides = ["--train.steps", "4", "--train.warmup_steps", "1", "--eval.interval", "2", "--data.seq_len", "32",
                 "--train.global_batch_size", "4", "--model.moe.bias_update_rate", "0.05", *layout]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
           "scaletrain.train", CONFIG, *overrides, "--checkpoint.enable", "false", "--job.run_dir", str(tmp_path),
           "--job.name", "run"]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    pngs = sorted(p.name for p in (tmp_path / "run" / "moe_load").iterdir())
    assert pngs == ["step-00000002.png", "step-00000004.png"]
    # tiny-moe: 4 blocks, the first dense, 8 experts; under pp2 the stages' blocks are gathered.
    image = np.asarray(Image.open(tmp_path / "run" / "moe_load" / "step-00000004.png"))
    assert image.shape == (3 * CELL, 8 * CELL, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1  # not one flat colour: the loads differ
    evals = [r for r in rows if "eval/moe_max_load" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval/moe_max_load"] > 1 for r in evals)
    # TensorBoard got the image too (the event file names its tag).
    events = b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("events.out.tfevents.*"))
    assert b"moe/load" in events
