"""The flow recipe: RealNVP and Glow.

- Invertibility (float64): x -> z -> x within 1e-10, and the summed log-determinant equals the log|det| of
  autograd's full Jacobian on a 3x8x8 input, for both kinds, with every parameter moved off its init.
- Parity (gloo, fp32, 5 steps, against one process, within 1e-5 relative: losses and grad norms): DDP over 2
  ranks and FSDP2 over 2 for Glow (its actnorm's data-dependent init included: every rank computes it from
  the same items) and RealNVP; gradient accumulation in one process.
- Bad input before compute: an image size the multi-scale flow cannot squeeze, n_bits out of range.
"""

from __future__ import annotations

import pytest
import torch
from st_common import REPO

from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.parity import compare, run_layout
from scaletrain.recipes.flow.model import Flow, FlowConfig
from scaletrain.validate import validate_config

GLOW = str(REPO / "scaletrain" / "recipes" / "flow" / "configs" / "glow-tiny.yaml")
SMALL = ["--model.image_size", "8", "--model.steps", "2", "--model.hidden", "16", "--model.init_samples", "16",
         "--train.global_batch_size", "8", "--train.steps", "5", "--train.warmup_steps", "2",
         "--train.log_interval", "1", "--eval.interval", "0", "--checkpoint.enable", "false",
         "--metrics.tensorboard", "false"]  # fmt: skip
RTOL = 1e-5
LAYOUTS = {
    "ddp2": (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]),
    "fsdp2": (2, ["--parallel.dp_shard", "2"]),
    "accum4": (1, ["--train.micro_batch_size", "2"]),
}


@pytest.mark.parametrize("kind", ["glow", "realnvp"])
def test_flow_inverts_and_its_log_determinant_is_the_jacobians(kind):
    torch.manual_seed(0)
    cfg = FlowConfig(kind=kind, image_size=8, levels=2, steps=2, hidden=8)
    with torch.device("meta"):
        flow = Flow(cfg)
    init_model(flow, "cpu", 0)
    with torch.no_grad():  # off the identity start: zero-initialized layers would make the test easy
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow(torch.rand(4, 3, 8, 8) * 2 - 1, torch.rand(4, 3, 8, 8), mode="init")  # actnorm from data
    flow = flow.double()
    y = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    latents, logdet = flow.encode(y)
    assert [tuple(z.shape[1:]) for z in latents] == flow.latent_shapes()
    assert (flow.decode(latents) - y).abs().max() < 1e-10

    def encode_flat(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten() for z in flow.encode(v.view(1, 3, 8, 8))[0]])

    jacobian = torch.autograd.functional.jacobian(encode_flat, y[0].flatten())
    assert torch.isclose(logdet[0], torch.linalg.slogdet(jacobian)[1], rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cache = {}

    def get(kind: str) -> list[dict]:
        if kind not in cache:
            cache[kind] = run_layout(GLOW, SMALL + ["--model.kind", kind], tmp_path_factory.mktemp(kind), "one", 1)
        return cache[kind]

    return get


@pytest.mark.parametrize(
    ("kind", "layout"), [("glow", "ddp2"), ("glow", "fsdp2"), ("glow", "accum4"), ("realnvp", "ddp2"),
                         ("realnvp", "fsdp2")],
)  # fmt: skip
def test_flow_layouts_match_one_process(kind, layout, single, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    rows = run_layout(GLOW, SMALL + ["--model.kind", kind] + overrides, tmp_path, layout, nproc=nproc)
    report = compare(single(kind), rows)
    assert len(report.steps) == 5 and report.loss_a[-1] < report.loss_a[0]
    assert report.max_loss_rel_diff <= RTOL and report.max_grad_norm_rel_diff <= RTOL, report.table()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.image_size", "12", "--model.levels", "3"], r"model\.image_size: 12 cannot be squeezed 3 times"),
        (["--model.kind", "realnvp", "--model.image_size", "6", "--model.levels", "3"],
         r"model\.image_size: 6 cannot be squeezed 2 times"),
        (["--model.n_bits", "9"], r"model\.n_bits: 9 is not allowed; use 1\.\.8"),
    ],
    ids=["glow_size", "realnvp_size", "n_bits"],
)  # fmt: skip
def test_bad_flow_config_is_refused_before_compute(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(GLOW, overrides), 1)
