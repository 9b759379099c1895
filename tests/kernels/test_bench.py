"""kernels.bench: API shape, CPU correctness rows, CSV output, and the timing/ratio bookkeeping (with the
CUDA timer replaced by a stub so it runs on CPU)."""

import csv

import pytest
import torch

from kernels import bench


def test_run_cpu_reports_max_error_without_timing(device, tmp_path):  # noqa: ANN001
    if device.type != "cpu":
        pytest.skip("CPU-only behaviour")
    rows = bench.run(list(bench.KERNELS), [24], heads=2, head_dim=16, dtype="fp32", device="cpu")
    assert [r["kernel"] for r in rows] == list(bench.KERNELS)
    for r in rows:
        assert r["ms"] is None and r["backend"] == "triton-interpret"
        assert 0 <= r["max_err"] < 1e-4, r
    path = tmp_path / "bench.csv"
    bench.write_csv(rows, str(path))
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows) and read[0]["kernel"] == "attention" and "max_err" in read[0]
    assert bench.plot(rows, str(tmp_path / "bench.png")) is False  # nothing timed on CPU


def test_measure_builds_rows_and_ratios(monkeypatch, device):  # noqa: ANN001
    fake_ms = {"triton": 1.0, "eager": 3.0, "torch_rms_norm": 2.0}
    calls: list[str] = []

    def fake_time(step, dev):  # noqa: ANN001
        step()  # the closure must actually run forward (+ backward)
        calls.append("x")
        return fake_ms[order[len(calls) - 1]], 0.5

    case = bench._cases("rms_norm", 16, 2, 16, torch.float32, device)
    order = ["triton", *case["alts"]]
    monkeypatch.setattr(bench, "_time_ms", fake_time)
    rows = bench._measure(case, "fwd+bwd", device, {"kernel": "rms_norm"})
    assert [r["impl"] for r in rows] == order
    assert rows[0]["vs_eager"] == 3.0 and rows[0]["gbps"] > 0 and rows[0]["tflops"] is None
    if "torch_rms_norm" in order:
        assert rows[0]["vs_torch_rms_norm"] == 2.0


def test_cli_entry(device, capsys):  # noqa: ANN001
    if device.type != "cpu":
        pytest.skip("keeps the CLI check cheap")
    rows = bench.main(["--kernels", "swiglu", "--seq", "8,16", "--heads", "2", "--head-dim", "16",
                       "--dtype", "bf16", "--device", "cpu"])  # fmt: skip
    assert [r["shape"] for r in rows] == ["N8 F128", "N16 F128"]
    assert "swiglu" in capsys.readouterr().out
