"""WaveNet recipe: dilated causal convolutions over mu-law codes, conditioned on a class, on synthesized notes.

The loss is the cross-entropy of every code given the ones before it (teacher forcing), in bits per
sample: the uniform distribution over the codes scores log2(model.quantization_levels) = 8. Evaluation
reports held-out bits per sample beside that baseline, generates a clip per class (fast generation, at
model.temperature) and logs their waveforms and spectrograms as a picture, and the share whose dominant
frequency is a note of the requested pitch class (chance: 1/12).

  scaletrain train scaletrain/recipes/wavenet/configs/wavenet-tiny.yaml
  scaletrain sample runs/wavenet-tiny/checkpoints/step-00000400 --n 4 --class 3 --seconds 0.25 --out clips/
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scaletrain.checkpoint.loading import load_job_config, load_model
from scaletrain.config.schema import JobConfig
from scaletrain.distributed import destroy_distributed, init_distributed
from scaletrain.images.grid import class_labels, save_png
from scaletrain.parallel import ParallelDims, checkpoint_compile_and_shard
from scaletrain.recipes.wavenet.audio import (
    PITCH_CLASSES,
    TIMBRES,
    NotesDataConfig,
    NotesDataset,
    clip_samples,
    dominant_frequency,
    mu_law_decode,
    note_frequency,
    pitch_class_of,
)
from scaletrain.recipes.wavenet.model import WaveNet, WaveNetConfig, generate, receptive_field
from scaletrain.recipes.wavenet.render import clips_picture, write_wav
from scaletrain.registry import DataSpec, EvalSpec, ModelSpec, Recipe, StepSpec, register_recipe
from scaletrain.validate import check_all


def build_dataset(cfg: JobConfig) -> NotesDataset:
    return NotesDataset(cfg.data, cfg.model.quantization_levels, cfg.data.num_samples)


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["codes"], batch["label"]


def example_batch(cfg: JobConfig, batch_size: int) -> dict[str, torch.Tensor]:
    return {"codes": torch.zeros(batch_size, clip_samples(cfg.data), dtype=torch.int64, device="meta"),
            "label": torch.zeros(batch_size, dtype=torch.int64, device="meta")}  # fmt: skip


def bits_per_sample(logits_BQT: torch.Tensor, codes_BT: torch.Tensor) -> torch.Tensor:
    """Per clip: the mean cross-entropy of its codes, in bits."""
    nats = F.cross_entropy(logits_BQT.float(), codes_BT, reduction="none").mean(dim=1)
    return nats / math.log(2)


def loss(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return bits_per_sample(output, batch["codes"]).mean()


def full_weights_copy(model: torch.nn.Module, cfg: JobConfig) -> WaveNet:
    """An unsharded WaveNet with the (possibly FSDP-sharded, DDP-replicated) model's weights, for generation:
    sample-by-sample steps call layer methods FSDP2's hooks do not see, and would all-gather per sample.
    A collective under FSDP2: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        copy = WaveNet(cfg.model)
    copy.to_empty(device=next(model.parameters()).device)
    copy.load_state_dict(state)
    return copy.eval()


def generate_audio(
    model: WaveNet, labels: torch.Tensor, seconds: float, sample_rate: int, temperature: float, seed: int
) -> torch.Tensor:
    """Audio (B, T) in [-1, 1]: codes from fast generation, decoded."""
    device = model.embed.weight.device
    steps = max(1, round(seconds * sample_rate))
    codes = generate(model, labels.to(device), steps, temperature, torch.Generator().manual_seed(seed))
    return mu_law_decode(codes.cpu(), model.cfg.quantization_levels)


def held_out(cfg: JobConfig, n: int) -> dict[str, torch.Tensor]:
    """n clips the training never reads: the notes after data.num_samples."""
    items = NotesDataset(cfg.data, cfg.model.quantization_levels, cfg.data.num_samples + n)
    rows = [items[i] for i in range(cfg.data.num_samples, cfg.data.num_samples + n)]
    return {k: torch.stack([row[k] for row in rows]) for k in ("codes", "label")}


def pitch_accuracy(audio_BT: torch.Tensor, labels: torch.Tensor, sample_rate: int) -> float:
    """Share of clips whose dominant frequency is a note of the requested pitch class."""
    found = pitch_class_of(dominant_frequency(audio_BT, sample_rate))
    return (found == labels.cpu()).double().mean().item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: JobConfig, dims: ParallelDims, step: int, logger: Any) -> dict[str, float]:
    """Held-out bits per sample (and the uniform baseline); eval.num_samples generated clips of data.clip_seconds,
    classes in turn, pictured (waveform + spectrogram) and four of them as audio, their RMS, and their pitch
    accuracy when class-conditional."""
    m, d, n = cfg.model, cfg.data, cfg.eval.num_samples
    device = next(model.parameters()).device
    batch = held_out(cfg, n)
    codes = batch["codes"].to(device)
    bits = bits_per_sample(model(codes, batch["label"].to(device)), codes).mean().item()
    labels = torch.arange(n) % m.num_classes if m.num_classes else torch.zeros(n, dtype=torch.int64)
    audio = generate_audio(full_weights_copy(model, cfg), labels, d.clip_seconds, d.sample_rate, m.temperature, 0)
    logger.log_image(step, "generated", clips_picture(audio[: min(n, len(PITCH_CLASSES))]))
    for index in range(min(n, 4)):  # a few clips to listen to in TensorBoard
        logger.log_audio(step, f"generated/{index}_class_{int(labels[index])}", audio[index], d.sample_rate)
    metrics = {"bits_per_sample_heldout": bits, "bits_per_sample_uniform": math.log2(m.quantization_levels),
               "generated_rms": audio.square().mean().sqrt().item()}  # fmt: skip  # ~0: collapsed to silence
    if m.num_classes:
        metrics["pitch_accuracy"] = pitch_accuracy(audio, labels, d.sample_rate)
    return metrics


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaletrain sample", description="Generate WAV clips from a WaveNet checkpoint.")
    p.add_argument("checkpoint", help="a checkpoint folder (runs/<name>/checkpoints/step-XXXXXXXX)")
    p.add_argument("--n", type=int, default=4, help="number of clips")
    p.add_argument("--class", dest="label", type=int, default=None, help="pitch class 0-11 (C=0; default: in turn)")
    p.add_argument("--seconds", type=float, default=0.25, help="length of each clip")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (default: model.temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="output folder: clip-NN.wav and clips.png")
    p.add_argument("--ema", choices=["auto", "yes", "no"], default="auto", help="use the EMA weights if present")
    p.add_argument("--config", default=None, help="training config YAML, when the checkpoint does not carry one")
    return p


def sample(argv: list[str]) -> None:
    args, overrides = _parser().parse_known_args(argv)
    check_all([(args.n >= 1, f"--n: {args.n} is not allowed; use >= 1"),
               (args.seconds > 0, f"--seconds: {args.seconds} is not allowed; use > 0"),
               (args.temperature is None or args.temperature > 0,
                f"--temperature: {args.temperature} is not allowed; use > 0")])  # fmt: skip
    folder = Path(args.checkpoint)
    cfg = load_job_config(folder, "wavenet", args.config, overrides)
    labels = class_labels(cfg.model.num_classes, args.n, args.label)
    temperature = cfg.model.temperature if args.temperature is None else args.temperature
    rate = cfg.data.sample_rate
    init_distributed("auto")
    try:
        model = load_model(folder, "wavenet", cfg, args.ema)
        start = time.perf_counter()
        audio = generate_audio(model, labels, args.seconds, rate, temperature, args.seed)
        seconds = time.perf_counter() - start
    finally:
        destroy_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = dominant_frequency(audio, rate)
    for i in range(args.n):
        write_wav(str(out / f"clip-{i:02d}.wav"), audio[i], rate)
        asked = f"class {PITCH_CLASSES[int(labels[i])]}, " if cfg.model.num_classes else ""
        heard = PITCH_CLASSES[int(pitch_class_of(found[i]))]
        print(f"{out / f'clip-{i:02d}.wav'}: {asked}dominant frequency {found[i]:.1f} Hz ({heard})")
    save_png(clips_picture(audio), str(out / "clips.png"))
    print(f"wrote {args.n} clips of {args.seconds} s and {out / 'clips.png'}; generated in {seconds:.2f} s "
          f"({args.n * args.seconds / seconds:.3f} s of audio per second)")  # fmt: skip


def parallelize(model: WaveNet, dims: ParallelDims, cfg: JobConfig) -> WaveNet:
    """Activation checkpointing -> compile -> FSDP2/DDP, one unit per residual layer."""
    layers = list(model.layers)
    return checkpoint_compile_and_shard(model, layers, dims, cfg)


def validate(cfg: JobConfig, dims: ParallelDims) -> None:
    m, d = cfg.model, cfg.data
    check_all(
        [
            (m.cycles >= 1, f"model.cycles: {m.cycles} is not allowed; use >= 1"),
            (m.layers_per_cycle >= 1, f"model.layers_per_cycle: {m.layers_per_cycle} is not allowed; use >= 1"),
            (m.kernel_size >= 2, f"model.kernel_size: {m.kernel_size} is not allowed; use >= 2"),
            (2 <= m.quantization_levels <= 65536,
             f"model.quantization_levels: {m.quantization_levels} is not allowed; use 2..65536"),
            (m.num_classes in (0, len(PITCH_CLASSES)),
             f"model.num_classes: {m.num_classes} is not allowed; the notes have {len(PITCH_CLASSES)} pitch "
             f"classes: use {len(PITCH_CLASSES)} (conditional) or 0"),
            *[(getattr(m, f) >= 1, f"model.{f}: {getattr(m, f)} is not allowed; use >= 1")
              for f in ("residual_channels", "gate_channels", "skip_channels", "head_channels")],
            (m.temperature > 0, f"model.temperature: {m.temperature} is not allowed; use > 0"),
            (d.sample_rate >= 1000, f"data.sample_rate: {d.sample_rate} is not allowed; use >= 1000"),
            (d.octaves >= 1, f"data.octaves: {d.octaves} is not allowed; use >= 1"),
            (note_frequency(len(PITCH_CLASSES) - 1, d.octave_low + d.octaves - 1) < d.sample_rate / 2,
             f"data.octave_low: notes up to octave {d.octave_low + d.octaves - 1} are above the Nyquist "
             f"frequency of data.sample_rate={d.sample_rate}; use a lower octave or a higher rate"),
            (bool(d.timbres) and set(d.timbres) <= set(TIMBRES),
             f"data.timbres: {d.timbres} is not allowed; use some of {list(TIMBRES)}"),
            (d.noise_std >= 0, f"data.noise_std: {d.noise_std} is not allowed; use >= 0"),
            (receptive_field(m) <= clip_samples(d),
             f"model: the receptive field is {receptive_field(m)} samples (kernel_size {m.kernel_size}, "
             f"{m.cycles} cycles of {m.layers_per_cycle} layers), longer than a clip of data.clip_seconds="
             f"{d.clip_seconds} at {d.sample_rate} Hz ({clip_samples(d)} samples); use fewer layers or longer clips"),
        ]
    )  # fmt: skip


register_recipe(
    Recipe(
        name="wavenet",
        model=ModelSpec(config=WaveNetConfig, build=WaveNet, parallelize=parallelize),
        data=DataSpec(
            config=NotesDataConfig,
            build_dataset=build_dataset,
            unit="tokens",
            units_per_sample=lambda cfg: clip_samples(cfg.data),
            example_batch=example_batch,
        ),  # fmt: skip
        step=StepSpec(model_inputs=model_inputs, loss=loss),
        validate=validate,
        evaluation=EvalSpec(evaluate=evaluate, sample=sample),
    )
)
