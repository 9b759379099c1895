"""Audio for the WaveNet recipe: mu-law companding, procedurally synthesized notes, and their pitch.

The notes data set: item i is a note of pitch class i % 12 (C, C#, ..., B: balanced classes), its octave,
timbre, loudness, harmonic phases and envelope drawn from a generator seeded by (data.notes_seed, i), so
it is a pure function of i and every layout sees the same clips. Nothing is downloaded or stored. A
timbre is a harmonic spectrum whose fundamental is the loudest partial, so a clip's dominant frequency is
its pitch; partials above the Nyquist frequency are left out (no aliasing).

Items are {"codes": (T,) int64 mu-law codes, "label": int64 pitch class}; the model never sees floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scaletrain.config.schema import opt
from scaletrain.images.datasets import seeded_generator

PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
HARMONICS = 8
# Relative amplitude of partial n (1 = the fundamental) for each timbre.
TIMBRES = {
    "sine": lambda n: 1.0 if n == 1 else 0.0,
    "bright": lambda n: 1.0 / n,  # sawtooth-like: every partial
    "hollow": lambda n: 1.0 / n if n % 2 else 0.0,  # square-like: odd partials
    "mellow": lambda n: 1.0 / n**2,  # triangle-like: fast roll-off
}


@dataclass
class NotesDataConfig:
    """The `data` section of the WaveNet recipe: synthesized notes."""

    sample_rate: int = opt(16000, "Samples per second of the clips (and of generated audio).")
    clip_seconds: float = opt(0.064, "Length of a training clip; at least the model's receptive field.")
    num_samples: int = opt(100_000, "Clips in the training set (made on the fly); held-out clips come after them.")
    notes_seed: int = opt(0, "Seed of the notes data set (independent of job.seed, so it is the same data).")
    octave_low: int = opt(5, "Lowest octave of the notes (scientific pitch: A4 = 440 Hz, C5 = 523 Hz).")
    octaves: int = opt(1, "Octaves the notes span from octave_low, drawn per clip.")
    timbres: list[str] = opt(list(TIMBRES), f"Harmonic spectra the clips are drawn from: {', '.join(TIMBRES)}.")
    noise_std: float = opt(0.0, "Std of white noise added to every clip (0 = clean tones).")
    num_workers: int = opt(0, "Background loader processes.")


def clip_samples(data: NotesDataConfig) -> int:
    return round(data.sample_rate * data.clip_seconds)


def mu_law_encode(audio: torch.Tensor, levels: int) -> torch.Tensor:
    """Audio in [-1, 1] -> int64 codes 0..levels-1: F(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu), mu = levels - 1,
    then rounded to the nearest of `levels` evenly spaced values (ITU-T G.711's companding, continuous form)."""
    mu = levels - 1
    x = audio.clamp(-1, 1)
    y = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    return torch.floor((y + 1) / 2 * mu + 0.5).to(torch.int64)


def mu_law_decode(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes (integers, or fractional codes for bin edges) -> audio: the inverse F^-1(y) = sign(y) ((1 + mu)^|y| -
    1) / mu at each code's centre."""
    mu = levels - 1
    y = codes.to(torch.float64 if codes.dtype == torch.float64 else torch.float32) * 2 / mu - 1
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


def note_frequency(pitch_class: int, octave: int) -> float:
    """Equal temperament, A4 = 440 Hz; MIDI note 12 (octave + 1) + pitch_class."""
    return 440.0 * 2 ** ((12 * (octave + 1) + pitch_class - 69) / 12)


def synthesize_note(data: NotesDataConfig, index: int) -> tuple[torch.Tensor, int]:
    """(audio (T,) float32 in [-1, 1], pitch class) of item `index` (module doc)."""
    g = seeded_generator("wavenet-notes", data.notes_seed, index)
    pitch = index % len(PITCH_CLASSES)
    octave = data.octave_low + int(torch.randint(data.octaves, (1,), generator=g))
    timbre = TIMBRES[data.timbres[int(torch.randint(len(data.timbres), (1,), generator=g))]]
    loudness, attack_ms, decay_s = (torch.rand(3, generator=g) * torch.tensor([0.6, 8.0, 0.9])
                                    + torch.tensor([0.3, 2.0, 0.1])).tolist()  # fmt: skip
    phases = torch.rand(HARMONICS, generator=g, dtype=torch.float64) * 2 * math.pi
    f0 = note_frequency(pitch, octave)
    t = torch.arange(clip_samples(data), dtype=torch.float64) / data.sample_rate
    partials = [(n, timbre(n)) for n in range(1, HARMONICS + 1) if n * f0 < data.sample_rate / 2 and timbre(n) > 0]
    tone = sum(a * torch.sin(2 * math.pi * n * f0 * t + phases[n - 1]) for n, a in partials)
    tone = tone / sum(a for _, a in partials)
    envelope = torch.clamp(t / (attack_ms / 1000), max=1.0) * torch.exp(-t / decay_s)
    audio = loudness * envelope * tone
    if data.noise_std > 0:
        audio = audio + data.noise_std * torch.randn(audio.shape, generator=g, dtype=torch.float64)
    return audio.clamp(-1, 1).float(), pitch


class NotesDataset:
    """{codes, label} for items 0..length-1 (held-out sets index past the training set's length)."""

    def __init__(self, data: NotesDataConfig, levels: int, length: int) -> None:
        self.data, self.levels, self.length = data, levels, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        audio, pitch = synthesize_note(self.data, int(i))
        return {"codes": mu_law_encode(audio, self.levels), "label": torch.tensor(pitch, dtype=torch.int64)}


def dominant_frequency(audio_BT: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Hz of each clip's strongest spectral peak above 40 Hz (Hann window, FFT zero-padded 8x for a finer
    grid than 1 / clip length)."""
    T = audio_BT.shape[1]
    n_fft = 8 * 2 ** math.ceil(math.log2(T))
    x = audio_BT.double() - audio_BT.double().mean(dim=1, keepdim=True)
    magnitude = torch.fft.rfft(x * torch.hann_window(T, dtype=torch.float64), n=n_fft).abs()
    magnitude[:, : math.ceil(40 * n_fft / sample_rate)] = 0
    return magnitude.argmax(dim=1).double() * sample_rate / n_fft


def pitch_class_of(frequency: torch.Tensor) -> torch.Tensor:
    """The nearest equal-tempered note's pitch class (0 = C) of frequencies in Hz."""
    midi = 69 + 12 * torch.log2(frequency.double().clamp_min(1e-3) / 440)
    return torch.round(midi).to(torch.int64) % len(PITCH_CLASSES)
