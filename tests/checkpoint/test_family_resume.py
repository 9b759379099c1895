"""Checkpoints of the image families beyond diffusion.

The GAN (several networks): both networks, their AdamW groups (two peak LRs, WGAN's betas), the generator's
EMA and the RNG states are one checkpoint.

- kill -9 at step 6 of a DDP-2 WGAN-GP run (n_critic 2) and rerun the command: both phases' losses and
  grad norms equal the uninterrupted run's bitwise, and so does the evaluation at step 10, which samples
  with the EMA generator (a lost or stale EMA would change it);
- the DDP-2 run's step-5 checkpoint continues in one process: losses within 1e-5 (absolute for the
  generator's WGAN loss, a mean of critic scores near 0).

VQ-VAE: its codebook (embedding, moving averages, update count) lives in buffers; the DDP-2 run's step-5
checkpoint continues in one process within 1e-5 (losses, grad norms, codebook perplexity).

Glow: its actnorm's data-dependent init lives in buffers, saved with the weights; a resumed run does not
redo it (it would see the same items, but a checkpoint of a run with another init must win). The DDP-2 run's
step-5 checkpoint continues in one process within 1e-5.
"""

from __future__ import annotations

import json

from ckpt_harness import REPO, copy_checkpoint, torchrun

GAN = str(REPO / "scaletrain" / "recipes" / "gan" / "configs" / "dcgan-tiny.yaml")
BASE = [
    "--model.image_size", "16", "--model.channels", "16", "--model.loss", "wgan-gp", "--model.n_critic", "2",
    "--model.beta1", "0", "--model.beta2", "0.9", "--model.d_lr", "4e-4",
    "--train.global_batch_size", "8", "--train.steps", "10", "--train.ema_decay", "0.9",
    "--checkpoint.interval", "5", "--eval.interval", "10", "--eval.num_samples", "4", "--metrics.tensorboard", "false",
]  # fmt: skip
def metrics(run_dir, name) -> dict[int, dict]:
    """metrics.jsonl by step, a step's training and evaluation rows merged (a re-done step: the last)."""
    rows: dict[int, dict] = {}
    for line in (run_dir / name / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


KEYS = ("discriminator/loss", "generator/loss", "discriminator/grad_norm", "generator/grad_norm", "eval/fid_shapes")


def test_gan_kill_and_rerun_continues_bitwise(tmp_path):
    torchrun("ddp2", tmp_path, "straight", config=GAN, base=BASE)
    kill = [{"rank": 0, "step": 6, "where": "step", "action": "kill", "marker": str(tmp_path / "fired")}]
    first = torchrun("ddp2", tmp_path, "run", config=GAN, base=BASE, faults=kill, check=False)
    assert first.returncode != 0, "the first invocation should have been killed"
    torchrun("ddp2", tmp_path, "run", config=GAN, base=BASE)
    resumed, reference = metrics(tmp_path, "run"), metrics(tmp_path, "straight")
    assert sorted(resumed) == list(range(1, 11))
    assert "generator/loss" in reference[6] and "generator/loss" not in reference[7]
    for step in range(1, 11):
        for key in KEYS:
            assert resumed[step].get(key) == reference[step].get(key), f"step {step} {key}"
    assert "eval/fid_shapes" in reference[10]


def test_gan_ddp2_checkpoint_continues_in_one_process(tmp_path):
    torchrun("ddp2", tmp_path, "straight", config=GAN, base=BASE)
    copy_checkpoint(tmp_path / "straight", 5, tmp_path / "single")
    torchrun("single", tmp_path, "single", config=GAN, base=BASE)
    resumed, reference = metrics(tmp_path, "single"), metrics(tmp_path, "straight")
    assert sorted(s for s in resumed if "loss" in resumed[s]) == list(range(6, 11))
    for step in range(6, 11):
        for key in KEYS[:4]:
            if key in reference[step]:
                a, b = resumed[step][key], reference[step][key]
                tolerance = 1e-5 if key == "generator/loss" else 1e-5 * abs(b)
                assert abs(a - b) <= tolerance, f"step {step} {key}: {a} vs {b}"


GLOW = str(REPO / "scaletrain" / "recipes" / "flow" / "configs" / "glow-tiny.yaml")
GLOW_BASE = [
    "--model.image_size", "8", "--model.steps", "2", "--model.hidden", "16", "--model.init_samples", "16",
    "--train.global_batch_size", "8", "--train.steps", "10", "--train.warmup_steps", "2",
    "--checkpoint.interval", "5", "--metrics.tensorboard", "false",
]  # fmt: skip


def test_glow_ddp2_checkpoint_continues_in_one_process(tmp_path):
    straight = torchrun("ddp2", tmp_path, "straight", config=GLOW, base=GLOW_BASE)
    assert "data-dependent init: actnorm from items 0-15" in straight.stdout + straight.stderr
    copy_checkpoint(tmp_path / "straight", 5, tmp_path / "single")
    resumed_run = torchrun("single", tmp_path, "single", config=GLOW, base=GLOW_BASE)
    assert "data-dependent init" not in resumed_run.stdout + resumed_run.stderr
    resumed, reference = metrics(tmp_path, "single"), metrics(tmp_path, "straight")
    assert sorted(resumed) == list(range(6, 11))
    for step in range(6, 11):
        for key in ("loss", "grad_norm"):
            a, b = resumed[step][key], reference[step][key]
            assert abs(a - b) <= 1e-5 * abs(b), f"step {step} {key}: {a} vs {b}"


VQVAE = str(REPO / "scaletrain" / "recipes" / "autoencoder" / "configs" / "vqvae-tiny.yaml")
VQVAE_BASE = [
    "--model.image_size", "16", "--model.channels", "16", "--model.channel_mult", "1,2", "--model.codebook_size", "16",
    "--train.global_batch_size", "8", "--train.steps", "10", "--train.warmup_steps", "2",
    "--checkpoint.interval", "5", "--eval.interval", "0", "--metrics.tensorboard", "false",
]  # fmt: skip


def test_vqvae_ddp2_checkpoint_continues_in_one_process(tmp_path):
    torchrun("ddp2", tmp_path, "straight", config=VQVAE, base=VQVAE_BASE)
    copy_checkpoint(tmp_path / "straight", 5, tmp_path / "single")
    torchrun("single", tmp_path, "single", config=VQVAE, base=VQVAE_BASE)
    resumed, reference = metrics(tmp_path, "single"), metrics(tmp_path, "straight")
    assert sorted(resumed) == list(range(6, 11))
    for step in range(6, 11):
        for key in ("loss", "grad_norm", "codebook_perplexity"):
            a, b = resumed[step][key], reference[step][key]
            assert abs(a - b) <= 1e-5 * abs(b), f"step {step} {key}: {a} vs {b}"
