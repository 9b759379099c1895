"""Checkpoints of pipelines with several stages per rank (interleaved / V-shaped schedules).

Each rank trains a union of its stages under the whole model's parameter names
(scaletrain.parallel.pipeline.stage_union), so a checkpoint written by pp=2 x 2 stages per
rank resumes bitwise under the same layout and, within the layout-parity tolerance, under
one process (the reduction order differs) — and the reverse.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from st_common import FAST, TINY
from torch import nn

from scaletrain.parallel.pipeline import stage_union
from scaletrain.registry import PipelineSpec

RESHARD_RTOL = 1e-5  # as tests/checkpoint/test_reshard.py: layout-parity level (~1e-7 seen)
STEPS = 6
COMMON = [*FAST, "--model.n_layers", "4", "--train.steps", str(STEPS), "--checkpoint.interval", "3",
          "--metrics.tensorboard", "false", "--parallel.dp_shard", "1"]  # fmt: skip
LAYOUTS = {
    "single": (1, []),
    "interleaved_v2": (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b",
                           "--parallel.stages_per_rank", "2", "--parallel.microbatches", "4"]),
    "zbv": (2, ["--parallel.pp", "2", "--parallel.pp_schedule", "zbv", "--parallel.stages_per_rank", "2",
                "--parallel.microbatches", "4"]),
}  # fmt: skip


def _train(layout: str, root: Path, name: str) -> dict[int, float]:
    nproc, overrides = LAYOUTS[layout]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "scaletrain.train", TINY, *COMMON, *overrides, "--job.run_dir", str(root), "--job.name", name]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{layout} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _resume_from_step_3(source: Path, layout: str, root: Path) -> dict[int, float]:
    """Copy the source run's step-3 checkpoint into a fresh run and continue it under `layout`."""
    (checkpoint,) = (source / "checkpoints").glob("step-*3")
    shutil.copytree(checkpoint, root / "resumed" / "checkpoints" / checkpoint.name)
    return _train(layout, root, "resumed")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, tuple[Path, dict[int, float]]]:
    runs = {}
    for layout in ("single", "interleaved_v2"):
        root = tmp_path_factory.mktemp(layout)
        runs[layout] = root / "run", _train(layout, root, "run")
    return runs


def test_union_keeps_the_whole_models_names():
    model = nn.Module()
    model.embed, model.head = nn.Linear(2, 2), nn.Linear(2, 2)
    model.layers = nn.ModuleDict({str(i): nn.Linear(2, 2) for i in range(4)})
    stage0, stage2 = nn.Module(), nn.Module()
    stage0.embed, stage0.head, stage0.layers = model.embed, None, nn.ModuleDict({"0": model.layers["0"]})
    stage2.embed, stage2.head, stage2.layers = None, model.head, nn.ModuleDict({"3": model.layers["3"]})
    union = stage_union([stage0, stage2], PipelineSpec(trunk="layers", first=("embed",), last=("head",)))
    names = sorted(name for name, _ in union.named_parameters())
    assert names == sorted(f"{m}.{p}" for m in ("embed", "head", "layers.0", "layers.3") for p in ("weight", "bias"))
    assert union.layers["3"].weight is model.layers["3"].weight  # shared, not copied


@pytest.mark.parametrize(
    ("source", "target", "bitwise"),
    [
        ("interleaved_v2", "interleaved_v2", True),  # resume: same layout, same arithmetic
        ("interleaved_v2", "single", False),  # 2 ranks x 2 stages -> 1 process
        ("single", "zbv", False),  # 1 process -> V-shaped stages (0, 3 | 1, 2)
    ],
    ids=["resume", "to-single", "single-to-zbv"],
)
def test_multi_stage_checkpoint_resumes(source, target, bitwise, straight, tmp_path):
    source_dir, reference = straight[source]
    resumed = _resume_from_step_3(source_dir, target, tmp_path)
    assert sorted(resumed) == [4, 5, 6], "should resume at step 4"
    assert reference[4] != reference[6]  # the loss moved: equal values are not a constant
    rel = {s: abs(resumed[s] - reference[s]) / reference[s] for s in resumed}
    print(f"{source} -> {target}: max rel loss diff {max(rel.values()):.2e}")
    if bitwise:
        assert all(resumed[s] == reference[s] for s in resumed), rel
    assert max(rel.values()) <= RESHARD_RTOL, rel
