"""Layout parity of the DiT: one process vs DDP(2), FSDP2(2), HSDP(2 x 2), TP(2) x FSDP2(2),
activation checkpointing and torch.compile, fp32, 6 steps, through scaletrain.parity's torchrun
harness; and bf16 against that fp32 run.

Noise, timesteps and label drops are drawn per global sample in the data set, so every layout
trains on identical inputs; what is left is reduction order. Tolerances, max relative
difference per step (measured on the shared 2-core CPU in brackets):
  - fp32 layouts: loss <= 1e-5, grad norm <= 1e-4 (HSDP 1.2e-7 / 1.9e-7; others ~1e-7; a per-rank
    noise draw gives ~1e-1);
  - compiled blocks vs eager: loss <= 1e-5 (6.2e-8; the grad norms were equal);
  - bf16 vs fp32: loss <= 1e-3 (FSDP2 MixedPrecisionPolicy 8.3e-5, autocast 7.4e-5) and > 1e-6,
    so a run that silently stayed fp32 fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from st_common import STEP_MEMORY, assert_model_state_predicted

from scaletrain.parity import compare, run_layout

CONFIG = str(Path(__file__).resolve().parents[2] / "scaletrain/recipes/diffusion/configs/dit-tiny.yaml")
# Small enough for 4 CPU processes; 4 heads / MLP 128 so tp=2 divides them.
COMMON = [
    "--model.image_size",
    "16",
    "--model.patch_size",
    "4",
    "--model.dim",
    "64",
    "--model.depth",
    "2",
    "--model.n_heads",
    "4",
    "--train.steps",
    "6",
    "--train.warmup_steps",
    "1",
    "--train.global_batch_size",
    "8",
    "--train.ema_decay",
    "0",
    "--eval.interval",
    "0",
    "--metrics.console",
    "false",
]
RTOL = 1e-5

LAYOUTS = {
    "ddp2": (["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"], 2),
    "fsdp2": (["--parallel.dp_shard", "2"], 2),
    "hsdp2x2": (["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2"], 4),
    "tp2_fsdp2": (["--parallel.dp_shard", "2", "--parallel.tp", "2"], 4),
    "ac_full": (["--activation_checkpoint.mode", "full"], 1),
    "ac_op_fsdp2": (
        ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective", "op"]
        + ["--parallel.dp_shard", "2"],
        2,
    ),
    # The same recipe under DeepSpeed (scaletrain/engines): ZeRO shards instead of FSDP2.
    "deepspeed_zero2": (["--engine.name", "deepspeed", "--engine.deepspeed.zero_stage", "2"], 2),
    "deepspeed_zero3": (["--engine.name", "deepspeed", "--engine.deepspeed.zero_stage", "3"], 2),
}
# Slow: inductor compiles each block on CPU (~45 s).
SLOW_LAYOUTS = {"compile": (["--train.compile", "true"], 1)}
BF16_RTOL, BF16_MIN_DIFF = 1e-3, 1e-6
BF16_LAYOUTS = {
    "bf16_fsdp2": (["--train.dtype", "bf16", "--parallel.dp_shard", "2"], 2),
    "bf16_autocast": (["--train.dtype", "bf16"], 1),
    # DeepSpeed casts the weights, autocast the fp32 images and noise levels that meet them.
    "bf16_deepspeed_zero2": (["--train.dtype", "bf16", "--engine.name", "deepspeed"], 2),
}


def _run(config: str, overrides: list[str], root: Path, name: str, nproc: int) -> list[dict]:
    try:
        return run_layout(config, overrides, root, name, nproc=nproc)
    except RuntimeError as exc:
        # Seen rarely on a loaded 2-core machine: gloo aborts a process at exit, after training
        # finished ("terminate called without an active exception"). Retry that case once only.
        if "terminate called without an active exception" not in str(exc):
            raise
        return run_layout(config, overrides, root, name, nproc=nproc)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    return _run(CONFIG, COMMON, tmp_path_factory.mktemp("ref"), "ref", nproc=1)


@pytest.mark.parametrize(
    "layout", sorted(LAYOUTS) + [pytest.param(name, marks=pytest.mark.slow) for name in SLOW_LAYOUTS]
)
def test_dit_layout_parity(layout, reference, tmp_path):
    overrides, nproc = {**LAYOUTS, **SLOW_LAYOUTS}[layout]
    native = not layout.startswith("deepspeed")  # the planner predicts the native engine
    # Compiled regions run as fused kernels the step simulation does not see: its activations are not compared.
    activations = native and layout != "compile"
    rows = _run(CONFIG, COMMON + overrides + (STEP_MEMORY if activations else []), tmp_path, layout, nproc=nproc)
    report = compare(reference, rows)
    assert len(report.steps) == 6
    # Training moved the loss, so equal losses are not two copies of a constant.
    assert report.loss_a[0] != report.loss_a[-1]
    assert report.max_loss_rel_diff <= RTOL, report.table()
    assert report.max_grad_norm_rel_diff <= 1e-4, report.table()
    if native:
        assert_model_state_predicted(CONFIG, COMMON + overrides, rows, activations=activations)


@pytest.mark.parametrize(
    "layout", ["bf16_fsdp2", "bf16_deepspeed_zero2", pytest.param("bf16_autocast", marks=pytest.mark.slow)]
)
def test_dit_bf16_trains_close_to_fp32(layout, reference, tmp_path):
    overrides, nproc = BF16_LAYOUTS[layout]
    rows = _run(CONFIG, COMMON + overrides, tmp_path, layout, nproc=nproc)
    report = compare(reference, rows)
    assert len(report.steps) == 6
    assert report.max_loss_rel_diff <= BF16_RTOL, report.table()
    assert report.max_loss_rel_diff > BF16_MIN_DIFF, report.table()  # bf16 really ran
    assert rows[-1]["loss"] < rows[0]["loss"]


ROOT = Path(__file__).resolve().parents[2]
CONV_MODELS = {
    "unet": (
        str(ROOT / "scaletrain/recipes/diffusion/configs/unet-tiny.yaml"),
        ["--model.image_size", "8", "--model.channels", "16", "--model.channel_mult", "1,2", "--model.groups", "4"],
    ),
    "vae": (
        str(ROOT / "scaletrain/recipes/diffusion/configs/vae-tiny.yaml"),
        ["--model.image_size", "8", "--model.channels", "8", "--model.channel_mult", "1,2", "--model.groups", "4"],
    ),
}
CONV_COMMON = ["--train.steps", "4", "--train.warmup_steps", "1", "--train.global_batch_size", "8",
               "--train.ema_decay", "0", "--eval.interval", "0", "--metrics.console", "false"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(CONV_MODELS))
@pytest.mark.parametrize("layout", ["ddp2", "fsdp2"])
def test_unet_and_vae_data_parallel_parity(model, layout, tmp_path):
    config, size = CONV_MODELS[model]
    ref = _run(config, size + CONV_COMMON, tmp_path, "ref", nproc=1)
    overrides, nproc = LAYOUTS[layout]
    report = compare(ref, _run(config, size + CONV_COMMON + overrides, tmp_path, layout, nproc=nproc))
    assert report.loss_a[0] != report.loss_a[-1]
    assert report.max_loss_rel_diff <= RTOL, report.table()
