"""Generated audio out of the WaveNet recipe: 16-bit WAV files and a picture (waveform beside spectrogram, one
row per clip) drawn with numpy into an image tensor, for TensorBoard and `scaletrain.images.grid.save_png`."""

from __future__ import annotations

import wave

import numpy as np
import torch

PANEL_H, PANEL_W, PAD = 128, 256, 4
N_FFT = 2 * (PANEL_H - 1)  # PANEL_H frequency bins, 0 .. Nyquist
# Dark blue -> purple -> orange -> pale yellow, for log magnitude from -80 dB to 0 dB of the clip's peak.
_RAMP = np.array([[0.02, 0.02, 0.10], [0.40, 0.10, 0.50], [0.95, 0.45, 0.15], [1.00, 0.95, 0.70]])


def write_wav(path: str, audio_T: torch.Tensor, sample_rate: int) -> None:
    """Mono 16-bit PCM (stdlib wave)."""
    pcm = (audio_T.float().clamp(-1, 1).cpu().numpy() * 32767).round().astype("<i2")
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def waveform_panel(audio_T: np.ndarray) -> np.ndarray:
    """(PANEL_H, PANEL_W) grey levels: per column the span of the samples it covers (joined to the previous
    column's last sample, so a fast wave stays one connected trace), on a white ground with a zero line."""
    panel = np.ones((PANEL_H, PANEL_W))
    panel[PANEL_H // 2, :] = 0.8
    edges = np.linspace(0, len(audio_T), PANEL_W + 1).astype(int)
    rows = np.clip(((1 - np.clip(audio_T, -1, 1)) / 2 * (PANEL_H - 1)).round().astype(int), 0, PANEL_H - 1)
    for column in range(PANEL_W):
        start, stop = max(edges[column] - 1, 0), max(edges[column + 1], edges[column] + 1)
        span = rows[start:stop]
        if len(span):
            panel[span.min() : span.max() + 1, column] = 0.1
    return panel


def spectrogram_panel(audio_T: torch.Tensor) -> np.ndarray:
    """(3, PANEL_H, PANEL_W) colours of the log-magnitude STFT, low frequencies at the bottom."""
    hop = max(1, len(audio_T) // PANEL_W)
    stft = torch.stft(audio_T.double(), N_FFT, hop_length=hop, window=torch.hann_window(N_FFT, dtype=torch.float64),
                      return_complex=True).abs()  # fmt: skip
    db = 20 * torch.log10(stft / stft.max().clamp_min(1e-12) + 1e-12)
    level = ((db.clamp(-80, 0) + 80) / 80).numpy()[::-1]  # (PANEL_H, frames), top row = Nyquist
    columns = np.linspace(0, level.shape[1] - 1, PANEL_W).round().astype(int)
    level = level[:, columns]
    stops = np.linspace(0, 1, len(_RAMP))
    return np.stack([np.interp(level, stops, _RAMP[:, c]) for c in range(3)])


def clips_picture(audio_BT: torch.Tensor) -> torch.Tensor:
    """CHW in [0, 1]: a row per clip, its waveform on the left and its spectrogram on the right."""
    audio_BT = audio_BT.detach().double().cpu()
    B = audio_BT.shape[0]
    picture = np.ones((3, PAD + B * (PANEL_H + PAD), 3 * PAD + 2 * PANEL_W))
    for i in range(B):
        top = PAD + i * (PANEL_H + PAD)
        picture[:, top : top + PANEL_H, PAD : PAD + PANEL_W] = waveform_panel(audio_BT[i].numpy())[None]
        picture[:, top : top + PANEL_H, 2 * PAD + PANEL_W : 2 * PAD + 2 * PANEL_W] = spectrogram_panel(audio_BT[i])
    return torch.from_numpy(picture).float()
