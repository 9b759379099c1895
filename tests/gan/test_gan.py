"""The GAN recipe: two networks, two phases per step, one root module.

Parity (gloo, fp32, 5 steps, against one process): DDP over 2 ranks and FSDP2 over 2, for the
non-saturating loss, hinge with class conditioning and spectral norm, and WGAN-GP with n_critic=2 (its
gradient penalty differentiates a gradient: double backward through DDP and FSDP2); gradient
accumulation in one process. Both phases' losses and gradient norms are compared: grad norms within 1e-5
relative; losses within 1e-5 relative, or 1e-5 absolute for WGAN's generator loss, a mean of critic scores
near 0 (observed: 5.6e-7 absolute, 6e-4 relative, while its grad norms agree to 3.5e-7).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from st_common import REPO

from scaletrain import cli
from scaletrain.checkpoint.export import consolidated_tensors
from scaletrain.config import load_config
from scaletrain.parallel import init_model
from scaletrain.parity import run_layout
from scaletrain.recipes.gan.model import GAN as GANModel
from scaletrain.recipes.gan.model import PHASES
from scaletrain.registry import Phase
from scaletrain.train import freeze_untrained
from scaletrain.validate import validate_config

GAN = str(REPO / "scaletrain" / "recipes" / "gan" / "configs" / "dcgan-tiny.yaml")
SMALL = ["--model.image_size", "16", "--model.channels", "16", "--train.global_batch_size", "8",
         "--train.steps", "5", "--train.log_interval", "1", "--eval.interval", "0",
         "--checkpoint.enable", "false", "--metrics.tensorboard", "false"]  # fmt: skip
RTOL = ATOL_NEAR_ZERO = 1e-5
LOSSES = {
    "nonsaturating": [],
    "hinge_conditional_sn": ["--model.loss", "hinge", "--model.num_classes", "6", "--model.spectral_norm", "true"],
    "wgan_gp": ["--model.loss", "wgan-gp", "--model.n_critic", "2", "--model.beta1", "0", "--model.beta2", "0.9"],
}
LAYOUTS = {
    "ddp2": (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]),
    "fsdp2": (2, ["--parallel.dp_shard", "2"]),
    "accum4": (1, ["--train.micro_batch_size", "2"]),
}
PHASE_KEYS = ("discriminator/loss", "generator/loss", "discriminator/grad_norm", "generator/grad_norm")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cache = {}

    def get(loss: str) -> list[dict]:
        if loss not in cache:
            rows = run_layout(GAN, SMALL + LOSSES[loss], tmp_path_factory.mktemp(loss), "one", nproc=1)
            cache[loss] = [r for r in rows if "loss" in r]
        return cache[loss]

    return get


@pytest.mark.parametrize(
    ("loss", "layout"),
    [("nonsaturating", "ddp2"), ("nonsaturating", "fsdp2"), ("nonsaturating", "accum4"),
     ("hinge_conditional_sn", "ddp2"), ("wgan_gp", "ddp2"), ("wgan_gp", "fsdp2")],
)  # fmt: skip
def test_gan_layouts_match_one_process(loss, layout, single, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    reference = single(loss)
    rows = [r for r in run_layout(GAN, SMALL + LOSSES[loss] + overrides, tmp_path, layout, nproc=nproc) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    every = 2 if loss == "wgan_gp" else 1  # n_critic: the generator phase runs on steps 2 and 4 only
    assert [("generator/loss" in r) for r in rows] == [s % every == 0 for s in range(1, 6)]
    assert reference[0]["discriminator/loss"] != reference[-1]["discriminator/loss"]
    for a, b in zip(reference, rows, strict=True):
        for key in PHASE_KEYS:
            assert (key in a) == (key in b), key
            if key not in a:
                continue
            near_zero_loss = key == "generator/loss" and loss == "wgan_gp"
            tolerance = ATOL_NEAR_ZERO if near_zero_loss else RTOL * abs(a[key])
            assert abs(a[key] - b[key]) <= tolerance, f"step {a['step']} {key}: {a[key]} vs {b[key]}"


def test_a_phase_updates_its_network_only(tmp_path):
    """n_critic=2: after step 1 (discriminator only) the generator's weights are still the initial ones;
    after step 2 both moved. Read from the checkpoints of a 2-step run."""
    overrides = SMALL + ["--model.n_critic", "2", "--train.steps", "2", "--checkpoint.enable", "true",
                         "--checkpoint.interval", "1", "--job.run_dir", str(tmp_path), "--job.name", "run"]  # fmt: skip
    cmd = [sys.executable, "-m", "scaletrain.train", GAN, *overrides]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    initial = init_model(GANModel(load_config(GAN, overrides).model), "cpu", 0).state_dict()
    saved = {step: consolidated_tensors(tmp_path / "run" / "checkpoints" / f"step-{step:08d}") for step in (1, 2)}
    g, d = "generator.out.weight", "discriminator.score.weight"
    assert torch.equal(saved[1][g], initial[g]) and not torch.equal(saved[1][d], initial[d])
    assert not torch.equal(saved[2][g], initial[g])


def test_networks_no_phase_trains_are_frozen_only_when_named():
    model = torch.nn.ModuleDict({"policy": torch.nn.Linear(2, 2), "reference": torch.nn.Linear(2, 2)})
    freeze_untrained(model, [Phase("policy", trains="policy")], frozen=("reference",))
    assert model["policy"].weight.requires_grad and not model["reference"].weight.requires_grad
    with pytest.raises(ValueError, match=r"phase 'value' trains 'critic', which is not one of the model's children"):
        freeze_untrained(model, [Phase("value", trains="critic")])


def test_a_gan_with_one_optimizer_missing_is_refused():
    """The generator's phase forgotten: the generator would never learn, silently."""
    gan = GANModel(load_config(GAN, SMALL).model)
    with pytest.raises(ValueError, match=r"\['generator'\] have parameters, but no phase trains them"):
        freeze_untrained(gan, [Phase("discriminator", trains="discriminator")])


def test_sample_command_and_eval_metrics(tmp_path, capsys):
    """Two steps with an EMA generator and an evaluation: the eval row has FID/KID (shapes features) and the
    class accuracy; `scaletrain sample` writes the grid from the checkpoint (EMA weights: the generator's
    only, the discriminator has none) and prints the same metrics."""
    overrides = SMALL + ["--train.steps", "2", "--train.ema_decay", "0.9", "--eval.interval", "2",
                         "--eval.num_samples", "12", "--model.num_classes", "6", "--checkpoint.enable", "true",
                         "--job.run_dir", str(tmp_path), "--job.name", "run"]  # fmt: skip
    subprocess.run([sys.executable, "-m", "scaletrain.train", GAN, *overrides], check=True, capture_output=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluation = next(r for r in rows if "eval/fid_shapes" in r)
    assert {"eval/kid_shapes", "eval/class_accuracy_shapes"} <= set(evaluation)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert cli.main(["sample", str(checkpoint), "--n", "12", "--out", str(tmp_path / "grid.png"), "--metrics"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "fid_shapes:" in out and "class_accuracy_shapes:" in out
    assert (tmp_path / "grid.png").stat().st_size > 0
    # Each network sized on its own, in `ckpt info` and in `config show`: the two must add up to the total.
    assert cli.main(["ckpt", "info", str(checkpoint)]) == 0
    info = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":" in line)
    networks = dict(part.strip().rsplit(" ", 1) for part in info["networks"].split(", "))
    assert set(networks) == {"generator", "discriminator"}
    total = int(info["parameters"].replace(",", ""))
    assert sum(int(n.replace(",", "")) for n in networks.values()) == total
    summary = cli.model_summary(load_config(GAN, overrides))
    assert summary["parameters.generator"] + summary["parameters.discriminator"] == summary["parameters"] == total


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["--model.n_critic", "0"], 1, r"model\.n_critic: 0 is not allowed; use >= 1"),
        (["--model.image_size", "24"], 1, r"model\.image_size: 24 is not allowed; use a power of two >= 8"),
        (["--engine.name", "deepspeed"], 1, r"engine\.name: recipe 'gan' trains several networks in phases"),
        (["--parallel.tp", "2"], 2, r"parallel\.tp: recipe 'gan' has no tensor-parallel plan"),
    ],
    ids=["n_critic_0", "image_size", "engine", "tp"],
)
def test_bad_gan_config_is_refused_before_compute(overrides, world, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(GAN, overrides), world)


def test_bench_baseline_loop_trains_each_network_with_its_own_optimizer():
    """`scaletrain bench`'s hand-written baseline for a GAN: one AdamW per network at its phase's LR, both
    networks updated in a step (a baseline that ran one phase would flatter itself by half)."""
    from scaletrain.bench import PlainLoop
    from scaletrain.distributed import destroy_distributed, init_distributed
    from scaletrain.registry import get_recipe
    from scaletrain.train import Trainer

    cfg = load_config(GAN, [*SMALL, "--model.g_lr", "3e-4", "--model.d_lr", "1e-4"])
    dims = validate_config(cfg, 1)
    dataset = get_recipe(cfg.recipe).data.build_dataset(cfg)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    try:
        loop = PlainLoop(Trainer(cfg, dims, dataset, info.device))
        owned = {name: {id(p) for p in loop.model.get_submodule(name).parameters()} for name in PHASES}
        for phase, optimizer in zip(loop.phases, loop.optimizers, strict=True):
            params = {id(p) for group in optimizer.param_groups for p in group["params"]}
            assert params == owned[phase.trains]
            assert optimizer.param_groups[0]["lr"] == {"generator": 3e-4, "discriminator": 1e-4}[phase.trains]
        before = {name: p.detach().clone() for name, p in loop.model.named_parameters()}
        loop.train_step()
        changed = {name.split(".")[0] for name, p in loop.model.named_parameters() if not torch.equal(p, before[name])}
        assert changed == {"generator", "discriminator"}
    finally:
        destroy_distributed()
