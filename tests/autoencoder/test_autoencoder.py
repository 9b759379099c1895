"""The autoencoder family: VQ-VAE, beta-VAE, denoising autoencoder.

Parity (gloo, fp32, 5 steps, against one process; losses and grad norms within 1e-5 relative): DDP over 2
ranks and FSDP2 over 2, and gradient accumulation in one process. For the VQ-VAE this covers the codebook:
its moving averages move once per optimizer step from counts and sums over the global batch, so a layout
that updated per micro-batch or per rank would drift from step 2 (the codebook perplexity is compared too).
The beta-VAE runs with KL annealing and free bits. Bad input is refused before compute.
"""

from __future__ import annotations

import pytest
from st_common import REPO

from scaletrain.config import load_config
from scaletrain.parity import run_layout
from scaletrain.validate import validate_config

VQVAE = str(REPO / "scaletrain" / "recipes" / "autoencoder" / "configs" / "vqvae-tiny.yaml")
SMALL = ["--model.image_size", "16", "--model.channels", "16", "--model.channel_mult", "1,2",
         "--model.codebook_size", "16", "--train.global_batch_size", "8", "--train.steps", "5",
         "--train.warmup_steps", "2", "--train.log_interval", "1", "--eval.interval", "0",
         "--checkpoint.enable", "false", "--metrics.tensorboard", "false"]  # fmt: skip
KINDS = {
    "vq-vae": [],
    "beta-vae": ["--model.kind", "beta-vae", "--model.beta", "4", "--model.free_bits", "0.05",
                 "--model.kl_anneal_steps", "3"],
    "denoising": ["--model.kind", "denoising"],
}  # fmt: skip
LAYOUTS = {
    "ddp2": (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]),
    "fsdp2": (2, ["--parallel.dp_shard", "2"]),
    "accum4": (1, ["--train.micro_batch_size", "2"]),
}
RTOL = 1e-5
COMPARED = ("loss", "grad_norm", "codebook_perplexity", "kl_per_dim")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cache = {}

    def get(kind: str) -> list[dict]:
        if kind not in cache:
            rows = run_layout(VQVAE, SMALL + KINDS[kind], tmp_path_factory.mktemp(kind), "one", nproc=1)
            cache[kind] = [r for r in rows if "loss" in r]
        return cache[kind]

    return get


@pytest.mark.parametrize(
    ("kind", "layout"),
    [("vq-vae", "ddp2"), ("vq-vae", "fsdp2"), ("vq-vae", "accum4"), ("beta-vae", "ddp2"), ("beta-vae", "accum4"),
     ("denoising", "fsdp2")],
)  # fmt: skip
def test_autoencoder_layouts_match_one_process(kind, layout, single, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    reference = single(kind)
    rows = [r for r in run_layout(VQVAE, SMALL + KINDS[kind] + overrides, tmp_path, layout, nproc=nproc) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and reference[-1]["loss"] < reference[0]["loss"]
    if kind == "vq-vae":
        assert "codebook_perplexity" in rows[0]
    if kind == "beta-vae":
        assert [r["beta"] for r in rows] == pytest.approx([0.0, 4 / 3, 8 / 3, 4.0, 4.0])  # annealed over 3 steps
    for a, b in zip(reference, rows, strict=True):
        for key in COMPARED:
            if key in a:
                assert abs(a[key] - b[key]) <= RTOL * abs(a[key]), f"step {a['step']} {key}: {a[key]} vs {b[key]}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.codebook_size", "0"], r"model\.codebook_size: 0 is not allowed; use >= 1"),
        (["--model.kind", "beta-vae", "--model.beta", "-1"], r"model\.beta: -1\.0 is not allowed; use >= 0"),
        (["--model.image_size", "30"], r"model\.image_size: 30 is not divisible by 4"),
    ],
    ids=["codebook_0", "beta_negative", "image_size"],
)
def test_bad_autoencoder_config_is_refused_before_compute(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(VQVAE, overrides), 1)
