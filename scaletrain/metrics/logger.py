"""`MetricLogger`: the one object the trainer hands its per-step numbers to.

It fans a step's metrics out to the sinks that `MetricsSection` turns on (console, JSONL,
TensorBoard, W&B, MLflow). Only rank 0 writes anything; other ranks get a logger whose
calls do nothing, so the trainer never branches on rank. The keys the console formats
specially are `loss`, `lr`, `grad_norm`, `throughput` (units/s), `mfu` (a fraction, or
None when the peak is unknown) and `mem_gib`; any other key is logged as-is.

Optional backends are checked on *every* rank at construction: if rank 0 alone raised,
the other ranks would sit in their next collective until the timeout instead of failing.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np
import torch

from scaletrain.config.schema import MetricsSection
from scaletrain.metrics.sinks import (
    ConsoleSink,
    JsonlSink,
    MlflowSink,
    TensorBoardSink,
    WandbSink,
    import_optional,
)


def _plain(value: Any) -> float | int | None:
    """A metric as a plain Python number (0-d tensors and numpy scalars included) or None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().item()  # one host sync; the trainer logs every log_interval steps only
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return float(value)


def to_hwc_uint8(image: Any) -> np.ndarray:
    """A CHW / HWC / HW image (tensor or array; float in [0, 1] or uint8) as an HWC uint8 array.

    The layout is guessed from which end has 1, 3 or 4 channels; when both ends could be
    channels (e.g. 3x4x3) the PyTorch convention, CHW, wins.
    """
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"log_image expects a CHW, HWC or HW image, got shape {array.shape}")
    channels = (1, 3, 4)
    if array.shape[0] in channels:  # CHW, including the ambiguous both-ends case
        array = np.transpose(array, (1, 2, 0))
    elif array.shape[2] not in channels:
        raise ValueError(f"log_image: cannot find a 1/3/4-channel axis in shape {array.shape}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return np.ascontiguousarray(array)


class MetricLogger:
    """Per-step metrics to console / metrics.jsonl / TensorBoard / W&B / MLflow, from rank 0 only.

    `total_steps` is shown as `step N/total`; by default it is read from
    `config_dict["train"]["steps"]`. `stream` redirects the console (default: stdout).
    """

    def __init__(
        self,
        cfg: MetricsSection,
        run_dir: str,
        rank: int,
        config_dict: Mapping[str, Any],
        unit: str = "tokens",
        total_steps: int | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank = rank
        self.unit = unit
        if total_steps is None:
            train = config_dict.get("train") if isinstance(config_dict, Mapping) else None
            total_steps = train.get("steps") if isinstance(train, Mapping) else None
        self.total_steps = total_steps
        # Fail fast and everywhere (see module docstring) before any sink is opened.
        wandb = import_optional("wandb", "metrics.wandb") if cfg.wandb else None
        mlflow = import_optional("mlflow", "metrics.mlflow") if cfg.mlflow else None

        self._console: ConsoleSink | None = None
        self._jsonl: JsonlSink | None = None
        self._sinks: list[Any] = []  # sinks with log / log_image / close
        self._remote: list[Any] = []  # the subset whose failures must not stop training
        if rank != 0:
            return
        os.makedirs(run_dir, exist_ok=True)
        job = config_dict.get("job", {}) if isinstance(config_dict, Mapping) else {}
        name = (job.get("name") if isinstance(job, Mapping) else None) or os.path.basename(os.path.abspath(run_dir))
        if cfg.console:
            self._console = ConsoleSink(total_steps, unit, stream)
        if cfg.jsonl:
            self._jsonl = JsonlSink(os.path.join(run_dir, "metrics.jsonl"))
        if cfg.tensorboard:
            self._sinks.append(TensorBoardSink(os.path.join(run_dir, "tb"), config_dict))
        if wandb is not None:
            self._remote.append(WandbSink(wandb, cfg.wandb_project, name, run_dir, config_dict))
        if mlflow is not None:
            self._remote.append(MlflowSink(mlflow, cfg.mlflow_experiment, name, config_dict))

    @property
    def enabled(self) -> bool:
        """True on the rank that writes (rank 0)."""
        return self.rank == 0

    def _call_remote(self, method: str, *args: Any) -> None:
        # A remote backend that throws (network, quota, server) is dropped with a warning:
        # losing a dashboard is better than losing the training run.
        for sink in list(self._remote):
            try:
                getattr(sink, method)(*args)
            except Exception as err:  # noqa: BLE001 - any backend failure is non-fatal by design
                self._remote.remove(sink)
                warnings.warn(f"metrics: {type(sink).__name__}.{method} failed ({err!r}); disabling it", stacklevel=3)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step's metrics on every enabled sink (no-op off rank 0)."""
        if not self.enabled:
            return
        clean = {key: _plain(value) for key, value in metrics.items()}
        if self._console is not None:
            self._console.log(step, clean)
        if self._jsonl is not None:
            self._jsonl.log(step, clean, time.time())
        # NaN/Inf go to JSONL and console only; dashboards plot them as gaps or break axes.
        finite = {k: v for k, v in clean.items() if v is None or math.isfinite(v)}
        for sink in self._sinks:
            sink.log(step, finite)
        self._call_remote("log", step, finite)

    def log_image(self, step: int, tag: str, image: Any) -> None:
        """Log one image (CHW/HWC/HW, float in [0, 1] or uint8), e.g. a diffusion sample grid."""
        if not self.enabled:
            return
        hwc = to_hwc_uint8(image)
        for sink in self._sinks:
            sink.log_image(step, tag, hwc)
        self._call_remote("log_image", step, tag, hwc)

    def log_audio(self, step: int, tag: str, audio: Any, sample_rate: int) -> None:
        """Log one clip (a 1-D float waveform in [-1, 1]) to the dashboards that play sound (TensorBoard, W&B)."""
        if not self.enabled:
            return
        waveform = np.asarray(audio.detach().cpu() if hasattr(audio, "detach") else audio, dtype=np.float32)
        if waveform.ndim != 1:
            raise ValueError(f"log_audio expects a 1-D waveform, got shape {waveform.shape}")
        waveform = np.clip(waveform, -1.0, 1.0)
        for sink in self._sinks:
            sink.log_audio(step, tag, waveform, sample_rate)
        self._call_remote("log_audio", step, tag, waveform, sample_rate)

    def log_text(self, message: str) -> None:
        """A plain info line on the console of rank 0 (when the console sink is on)."""
        if self.enabled and self._console is not None:
            self._console.text(message)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []
        self._call_remote("close")
        self._remote = []

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
