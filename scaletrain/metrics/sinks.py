"""The places metrics go: console, JSONL, TensorBoard, Weights & Biases, MLflow.

Each sink has the same three methods — `log(step, metrics)`, `log_image(step, tag, hwc)`,
`close()` — and knows nothing about ranks or config; `MetricLogger` decides which sinks
exist. Values reaching a sink are already plain Python numbers or None (None = "not
available this step", e.g. MFU on an unknown GPU); numeric sinks skip the Nones.

W&B and MLflow are optional packages: `import_optional` turns a missing one into a clear
error at start-up, and their calls are wrapped by `MetricLogger` so a network hiccup mid
run costs a warning, never the run.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any, TextIO

import numpy as np

Metrics = Mapping[str, "float | int | None"]

# Console labels of the well-known keys, in print order. Anything else is appended as `key value`.
KNOWN_KEYS = ("loss", "lr", "grad_norm", "throughput", "mfu", "mem_gib")
_UNIT_SHORT = {"tokens": "tok", "samples": "samples", "images": "img", "frames": "frames"}


class MissingDependencyError(ImportError):
    """An optional logging backend was asked for in the config but is not installed."""


def import_optional(module: str, flag: str) -> ModuleType:
    """Import `module`, or fail with the pip command and the config flag that asked for it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{flag}=true needs the '{module}' package, which is not installed: "
            f"pip install {module}  (or set {flag}=false)"
        ) from err


def _numeric(metrics: Metrics) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _si(value: float) -> str:
    """45123.4 -> '45.1k': throughput at a glance without counting digits."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.1f}"


def format_progress(step: int, total_steps: int | None, metrics: Metrics, unit: str = "tokens") -> str:
    """One console line: `step 12/200 | loss 2.3412 | lr 3.0e-03 | gnorm 0.812 | 45.1k tok/s | mfu 41.2% | ...`."""
    parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
    for key in KNOWN_KEYS:
        if key not in metrics:
            continue
        value = metrics[key]
        if key == "mfu":
            parts.append("mfu n/a" if value is None else f"mfu {100.0 * value:.1f}%")
            continue
        if value is None:
            continue
        if key == "loss":
            parts.append(f"loss {value:.4f}")
        elif key == "lr":
            parts.append(f"lr {value:.1e}")
        elif key == "grad_norm":
            parts.append(f"gnorm {value:.3f}")
        elif key == "throughput":
            parts.append(f"{_si(value)} {_UNIT_SHORT.get(unit, unit)}/s")
        elif key == "mem_gib":
            parts.append(f"mem {value:.2f} GiB")
    for key, value in metrics.items():
        if key in KNOWN_KEYS or value is None:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


class ConsoleSink:
    """Prints one progress line per logged step (and free-text info lines)."""

    def __init__(self, total_steps: int | None, unit: str, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.unit = unit
        self.stream = stream

    def _print(self, line: str) -> None:
        # Resolve sys.stdout at call time so pytest's capsys and redirections see the output.
        print(line, file=self.stream or sys.stdout, flush=True)

    def log(self, step: int, metrics: Metrics) -> None:
        self._print(format_progress(step, self.total_steps, metrics, self.unit))

    def text(self, message: str) -> None:
        self._print(message)

    def log_image(self, step: int, tag: str, hwc: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    """Appends `{"step": ..., "time": ..., **metrics}` per step to metrics.jsonl.

    Append mode so a resumed run continues the same file; flushed every line so a crash
    loses nothing already logged. NaN/Inf are written as Python's json does (NaN,
    Infinity), which json.loads and pandas read back — a NaN loss is worth seeing.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: TextIO | None = open(path, "a", encoding="utf-8")  # closed in close()

    def log(self, step: int, metrics: Metrics, wall_time: float) -> None:
        if self._file is None:
            return
        record = {"step": step, "time": round(wall_time, 3), **metrics}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardSink:
    """Scalars under `train/<key>` in <run>/tb, images under their own tag, config as text."""

    def __init__(self, log_dir: str, config: Mapping[str, Any]) -> None:
        # Imported here: tensorboard pulls in a lot and only rank 0 needs it.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir, flush_secs=30)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, step: int, metrics: Metrics) -> None:
        for key, value in _numeric(metrics).items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def log_image(self, step: int, tag: str, hwc: np.ndarray) -> None:
        self.writer.add_image(tag, hwc, step, dataformats="HWC")

    def log_audio(self, step: int, tag: str, waveform: np.ndarray, sample_rate: int) -> None:
        self.writer.add_audio(tag, waveform[None], step, sample_rate=sample_rate)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per job; its id is kept in <run>/wandb_run_id so a resumed job continues it.

    Offline use follows W&B's own switch (WANDB_MODE=offline); nothing here forces a mode.
    """

    def __init__(self, wandb: ModuleType, project: str, name: str, run_dir: str, config: Mapping[str, Any]) -> None:
        self.wandb = wandb
        id_file = os.path.join(run_dir, "wandb_run_id")
        run_id = None
        if os.path.exists(id_file):
            with open(id_file, encoding="utf-8") as handle:
                run_id = handle.read().strip() or None
        self.run = wandb.init(project=project, name=name, dir=run_dir, config=dict(config), id=run_id, resume="allow")
        new_id = getattr(self.run, "id", None)
        if new_id and new_id != run_id:
            with open(id_file, "w", encoding="utf-8") as handle:
                handle.write(str(new_id))

    def log(self, step: int, metrics: Metrics) -> None:
        self.run.log({f"train/{k}": v for k, v in _numeric(metrics).items()}, step=step)

    def log_image(self, step: int, tag: str, hwc: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(hwc)}, step=step)

    def log_audio(self, step: int, tag: str, waveform: np.ndarray, sample_rate: int) -> None:
        self.run.log({tag: self.wandb.Audio(waveform, sample_rate=sample_rate)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class MlflowSink:
    """One MLflow run in `experiment`; the tracking URI comes from MLflow's own settings."""

    # MLflow caps a batch at 100 params and (older servers) a value at 500 characters.
    _BATCH, _MAX_VALUE = 100, 500

    def __init__(self, mlflow: ModuleType, experiment: str, name: str, config: Mapping[str, Any]) -> None:
        self.mlflow = mlflow
        mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=name)
        params = {k: str(v)[: self._MAX_VALUE] for k, v in _flatten(config).items()}
        items = list(params.items())
        for start in range(0, len(items), self._BATCH):
            mlflow.log_params(dict(items[start : start + self._BATCH]))

    def log(self, step: int, metrics: Metrics) -> None:
        self.mlflow.log_metrics({f"train/{k}": float(v) for k, v in _numeric(metrics).items()}, step=step)

    def log_image(self, step: int, tag: str, hwc: np.ndarray) -> None:
        try:  # MLflow >= 2.12 keeps step-indexed images under a key
            self.mlflow.log_image(hwc, key=tag, step=step)
        except TypeError:  # older MLflow: one artifact file per image
            self.mlflow.log_image(hwc, artifact_file=f"{tag}/step_{step:08d}.png")

    def log_audio(self, step: int, tag: str, waveform: np.ndarray, sample_rate: int) -> None:
        pass  # MLflow has no audio panel

    def close(self) -> None:
        self.mlflow.end_run()
