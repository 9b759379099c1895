"""Meta-device init: every parameter and buffer is owned by init_tensor, and the result does
not depend on whether the model was built on meta, on CPU, or sharded (FSDP2 on 4 ranks)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from st_common import REPO, TINY

from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.recipes.gpt.model import GPT

STYLES = {
    "llama": [],
    "gpt2": [
        "--model.norm",
        "layernorm",
        "--model.pos",
        "learned",
        "--model.mlp",
        "gelu",
        "--model.bias",
        "true",
        "--model.tie_embeddings",
        "true",
    ],
    # Router, stacked expert weights, shared expert and the balancing buffers.
    "moe": ["--model.moe.num_experts", "4", "--model.moe.num_shared_experts", "1", "--model.moe.first_dense", "1"],
}


def _tensors(model):
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


@pytest.mark.parametrize("style", list(STYLES))
def test_meta_init_covers_everything_and_matches_plain_init(style):
    cfg = load_config(TINY, STYLES[style]).model
    with torch.device("meta"):
        meta_model = GPT(cfg)
    init_model(meta_model, "cpu", seed=3)  # raises if init_tensor leaves any element unset (NaN sentinel)
    plain = init_model(GPT(cfg), "cpu", seed=3)
    meta_tensors, plain_tensors = _tensors(meta_model), _tensors(plain)
    assert meta_tensors.keys() == plain_tensors.keys()
    for name, tensor in meta_tensors.items():
        assert torch.isfinite(tensor).all(), f"{name} was not initialized"
        assert torch.equal(tensor, plain_tensors[name]), name


def test_a_tensor_init_tensor_does_not_fill_is_caught(monkeypatch):
    """init_model fills each tensor with NaN before init_tensor, so one it skips (or fills only in part) fails."""
    cfg = load_config(TINY, []).model
    fill = GPT.init_tensor

    def skip_one(self, name, tensor, generator):  # noqa: ANN001, ANN202
        if name == "layers.1.attention.wk.weight":
            return
        fill(self, name, tensor, generator)

    monkeypatch.setattr(GPT, "init_tensor", skip_one)
    with torch.device("meta"):
        model = GPT(cfg)
    with pytest.raises(RuntimeError, match="GPT.init_tensor left .* 'layers.1.attention.wk.weight' unset"):
        init_model(model, "cpu", seed=3)


def test_seed_changes_weights_but_not_structure():
    cfg = load_config(TINY, []).model
    a, b = init_model(GPT(cfg), "cpu", seed=0), init_model(GPT(cfg), "cpu", seed=1)
    assert not torch.equal(a.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)
    assert torch.equal(a.norm.weight, b.norm.weight)  # deterministic (ones)


def test_unknown_tensor_is_an_error():
    model = GPT(load_config(TINY, []).model)
    model.extra = torch.nn.Linear(2, 2)  # a parameter init_tensor does not know
    model.extra.register_buffer("mystery", torch.zeros(1))
    with pytest.raises(KeyError, match="extra.mystery"):
        init_model(model, "cpu", seed=0)


def test_fsdp2_on_4_ranks_holds_a_quarter_and_matches_plain_init(tmp_path):
    """Run tests/core/dist_sharding_check.py on 4 gloo ranks and check what each reported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDING_OUT": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        str(REPO / "tests" / "core" / "dist_sharding_check.py"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    total = reports[0]["total_params"]
    for report in reports:
        # Each rank holds ~1/4 of every parameter (dim-0 chunks; small tensors round up).
        assert 0.24 <= report["local_params"] / total <= 0.27, report
        # AdamW's two moments live in the same shards: ~2/4 of the parameter count.
        assert 0.48 <= report["local_optimizer_state"] / total <= 0.54, report
        assert report["matches_plain_init"], report
    assert sum(r["local_params"] for r in reports) == total


def test_pipeline_rank_holds_only_its_stages(tmp_path):
    """pp=4 over 6 layers: every parameter lives on exactly one rank, and no rank holds more."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDING_OUT": str(tmp_path), "SHARDING_MODE": "pp"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           str(REPO / "tests" / "core" / "dist_sharding_check.py")]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    total = reports[0]["total_params"]
    assert sum(r["local_params"] for r in reports) == total
    all_names = [n for r in reports for n in r["names"]]
    assert len(all_names) == len(set(all_names))  # no parameter on two ranks
    assert "tok_embeddings.weight" in reports[0]["names"] and "output.weight" in reports[3]["names"]
    for r in reports:
        assert r["local_params"] < 0.5 * total, r["local_params"]
