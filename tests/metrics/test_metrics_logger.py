"""MetricLogger sinks (console, JSONL, TensorBoard, fake W&B / MLflow) and Throughput."""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from scaletrain.config.schema import MetricsSection
from scaletrain.metrics import MetricLogger, MissingDependencyError, Throughput, format_progress, to_hwc_uint8

CONFIG = {"job": {"name": "unit"}, "train": {"steps": 200, "lr": 3e-3}}


def _local(**overrides: object) -> MetricsSection:
    """Console + JSONL + TensorBoard, no remote backends."""
    return MetricsSection(**{"wandb": False, "mlflow": False, **overrides})


def test_console_line_has_all_fields() -> None:
    stream = io.StringIO()
    logger = MetricLogger(_local(jsonl=False, tensorboard=False), "unused", 0, CONFIG, stream=stream)
    logger.log(
        12,
        {
            "loss": 2.34117,
            "lr": 3e-3,
            "grad_norm": 0.8123,
            "throughput": 45_123.0,
            "mfu": 0.4123,
            "mem_gib": 1.234,
            "tokens_seen": 4096,
        },
    )
    logger.log(13, {"loss": torch.tensor(2.1), "mfu": None})
    logger.log_text("resumed from step 11")
    lines = stream.getvalue().splitlines()
    assert lines[0] == (
        "step 12/200 | loss 2.3412 | lr 3.0e-03 | gnorm 0.812 | 45.1k tok/s | mfu 41.2% "
        "| mem 1.23 GiB | tokens_seen 4096"
    )
    assert lines[1] == "step 13/200 | loss 2.1000 | mfu n/a"
    assert lines[2] == "resumed from step 11"


def test_format_units_and_no_total() -> None:
    assert format_progress(3, None, {"throughput": 2.5e6}, unit="images") == "step 3 | 2.5M img/s"
    assert format_progress(3, 10, {"throughput": 999.0}, unit="samples") == "step 3/10 | 999.0 samples/s"


def test_jsonl_lines_read_back(tmp_path) -> None:
    run = tmp_path / "run"
    with MetricLogger(_local(console=False, tensorboard=False), str(run), 0, CONFIG) as logger:
        for step in range(1, 4):
            logger.log(step, {"loss": 1.0 / step, "mfu": None, "tokens": 128 * step})
        # Flushed per line: readable before close, as after a crash.
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
        logger.log(4, {"loss": float("nan")})
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["loss"] == pytest.approx(0.5) and records[1]["mfu"] is None and records[2]["tokens"] == 384
    assert math.isnan(records[3]["loss"])
    # A resumed run appends to the same file.
    with MetricLogger(_local(console=False, tensorboard=False), str(run), 0, CONFIG) as logger:
        logger.log(5, {"loss": 0.1})
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5


def test_tensorboard_scalars_and_image(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = str(tmp_path / "run")
    with MetricLogger(_local(console=False, jsonl=False), run, 0, CONFIG) as logger:
        logger.log(1, {"loss": 3.5, "mfu": None})
        logger.log(2, {"loss": 2.25, "lr": 1e-3})
        logger.log_image(2, "samples", torch.rand(3, 8, 10))
    assert glob.glob(os.path.join(run, "tb", "events.out.tfevents.*"))
    events = EventAccumulator(os.path.join(run, "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.5), (2, 2.25)]
    image = events.Images("samples")[0]
    assert (image.step, image.height, image.width) == (2, 8, 10)


def test_tensorboard_audio(tmp_path) -> None:
    """A clip plays in TensorBoard at its sample rate; out-of-range samples are clipped, not wrapped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = str(tmp_path / "run")
    with MetricLogger(_local(console=False, jsonl=False), run, 0, CONFIG) as logger:
        logger.log_audio(3, "generated/class_2", 1.5 * torch.sin(torch.arange(1600) / 5.0), sample_rate=16_000)
        with pytest.raises(ValueError, match=r"log_audio expects a 1-D waveform"):
            logger.log_audio(3, "bad", np.zeros((2, 10)), sample_rate=16_000)
    events = EventAccumulator(os.path.join(run, "tb"), size_guidance={"audio": 0})
    events.Reload()
    clip = events.Audio("generated/class_2")[0]
    assert (clip.step, clip.sample_rate, clip.length_frames) == (3, 16_000, 1600)


def test_only_rank0_writes(tmp_path) -> None:
    stream = io.StringIO()
    run = tmp_path / "run"
    logger = MetricLogger(_local(), str(run), 1, CONFIG, stream=stream)
    logger.log(1, {"loss": 1.0})
    logger.log_text("hello")
    logger.log_image(1, "x", np.zeros((4, 4, 3), dtype=np.uint8))
    logger.close()
    assert not run.exists() and stream.getvalue() == ""


def test_wandb_requested_but_missing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("wandb") is None:
        real_missing = True
    else:
        real_missing = False
        monkeypatch.setitem(sys.modules, "wandb", None)  # make `import wandb` fail here only
    for rank in (0, 3):  # every rank fails the same way, so none hangs in a collective
        with pytest.raises(MissingDependencyError, match="pip install wandb"):
            MetricLogger(_local(wandb=True), str(tmp_path / "run"), rank, CONFIG)
    assert real_missing or "wandb" in sys.modules


def test_mlflow_requested_but_missing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MissingDependencyError, match="pip install mlflow"):
        MetricLogger(_local(mlflow=True), str(tmp_path / "run"), 0, CONFIG)


class _FakeRun:
    def __init__(self, calls: list, run_id: str) -> None:
        self.calls, self.id = calls, run_id

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", step, data))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_wandb_sink_with_fake_module(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in module: exercises our calls without network or the real package.
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or _FakeRun(calls, "abc123")
    fake.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    with MetricLogger(_local(console=False, wandb=True, wandb_project="proj"), str(run), 0, CONFIG) as logger:
        logger.log(7, {"loss": 1.5, "mfu": None, "lr": float("inf")})
        logger.log_image(7, "grid", np.zeros((2, 5, 3), dtype=np.float32))
    init = calls[0][1]
    assert init["project"] == "proj" and init["name"] == "unit" and init["config"] == CONFIG
    assert calls[1] == ("log", 7, {"train/loss": 1.5})  # None and non-finite values are not sent
    assert calls[2] == ("log", 7, {"grid": ("image", (2, 5, 3))})
    assert calls[-1] == ("finish",)
    assert (run / "wandb_run_id").read_text() == "abc123"
    # Resuming reuses the stored id.
    with MetricLogger(_local(console=False, wandb=True), str(run), 0, CONFIG):
        pass
    assert [c[1]["id"] for c in calls if c[0] == "init"] == [None, "abc123"]


def test_mlflow_sink_with_fake_module_and_failure_is_not_fatal(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    fake = types.ModuleType("mlflow")
    fake.set_experiment = lambda name: calls.append(("experiment", name))
    fake.start_run = lambda run_name: calls.append(("start", run_name))
    fake.log_params = lambda params: calls.append(("params", params))
    fake.end_run = lambda: calls.append(("end",))

    def log_metrics(metrics: dict, step: int) -> None:
        if step == 2:
            raise ConnectionError("tracking server unreachable")
        calls.append(("metrics", step, metrics))

    fake.log_metrics = log_metrics
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    with MetricLogger(_local(console=False, tensorboard=False, mlflow=True), str(tmp_path), 0, CONFIG) as logger:
        logger.log(1, {"loss": 2.0})
        with pytest.warns(UserWarning, match="MlflowSink.log failed"):
            logger.log(2, {"loss": 1.0})
        logger.log(3, {"loss": 0.5})  # sink dropped: no call, no exception
    assert calls[:3] == [
        ("experiment", "scaletrain"),
        ("start", "unit"),
        ("params", {"job.name": "unit", "train.steps": "200", "train.lr": "0.003"}),
    ]
    assert [c for c in calls if c[0] == "metrics"] == [("metrics", 1, {"train/loss": 2.0})]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # local sinks unaffected


@pytest.mark.parametrize(
    ("image", "shape"),
    [
        (np.ones((3, 6, 5), np.float32), (6, 5, 3)),
        (np.ones((6, 5, 3), np.float32), (6, 5, 3)),
        (np.ones((6, 5), np.float32), (6, 5, 1)),
        (torch.ones(1, 6, 5), (6, 5, 1)),
    ],
)
def test_image_layouts(image, shape) -> None:
    hwc = to_hwc_uint8(image)
    assert hwc.shape == shape and hwc.dtype == np.uint8 and int(hwc.max()) == 255
    with pytest.raises(ValueError):
        to_hwc_uint8(np.ones((6, 5, 7)))


def test_throughput_skips_warmup_and_windows() -> None:
    meter = Throughput(window=3, skip_first=1)
    meter.update(1000, 10.0)  # compile step: excluded
    assert meter.rate is None and meter.seconds_per_step is None
    meter.update(1000, 1.0)
    assert meter.rate == pytest.approx(1000.0)
    meter.update(1000, 3.0)
    # Ratio of sums over the window: 2000 units in 4 s, not the mean of 1000 and 333.
    assert meter.rate == pytest.approx(500.0) and meter.seconds_per_step == pytest.approx(2.0)
    for _ in range(3):
        meter.update(4000, 2.0)
    assert meter.rate == pytest.approx(2000.0)  # only the last 3 steps count
    with pytest.raises(ValueError):
        Throughput(window=0)
