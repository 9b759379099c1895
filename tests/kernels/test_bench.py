"""kernels.bench: CPU correctness rows, the timed flow (CUDA timers replaced by wall-clock / stub timers so
it runs on CPU), ratios, the Markdown report with the issue's goals, the auto-attention table entry, CSV
round trip, the plot, and the CLI. The CUDA-only calls themselves (do_bench, max_memory_allocated, SDPA
backends, compiled flex) can only run on a GPU: scripts/gpu_bench.sh."""

import csv
import json
import os
import sys
import time

import pytest
import torch

from scaletrain.kernels import bench


def _wall_clock(step, dev, grads=None):  # noqa: ANN001
    """Stands in for the CUDA timer: the step must really run (forward, and backward when asked)."""
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e3


def _fake_peak(step, dev, grads):  # noqa: ANN001
    step()
    return 1.0


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
    report = bench.markdown(rows, {"device": "cpu"})
    assert "CPU: correctness only" in report and report.count("triton-interpret") == len(rows)


def test_measure_builds_rows_and_ratios(monkeypatch, device):  # noqa: ANN001
    fake_ms = {"triton": 1.0, "eager": 3.0, "torch_rms_norm": 2.0}
    fake_peak = {"triton": 2.0, "eager": 8.0, "torch_rms_norm": 4.0}
    calls: list[str] = []

    def fake_time(step, dev, grads):  # noqa: ANN001
        step()  # the closure must actually run forward (+ backward)
        assert all(g.grad is not None for g in grads), "fwd+bwd must produce the input gradients"
        calls.append("x")
        return fake_ms[order[len(calls) - 1]]

    case = bench._cases("rms_norm", 16, 2, 16, torch.float32, device)
    order = ["triton", *case["alts"]]
    monkeypatch.setattr(bench, "_time_ms", fake_time)
    monkeypatch.setattr(bench, "_peak_mb", lambda step, dev, grads: fake_peak[order[len(calls) - 1]])
    rows = bench._measure(case, "fwd+bwd", device, {"kernel": "rms_norm"})
    assert [r["impl"] for r in rows] == order
    assert rows[0]["vs_eager"] == 3.0 and rows[0]["gbps"] > 0 and rows[0]["tflops"] is None
    assert rows[0]["mem_vs_eager"] == 4.0
    if "torch_rms_norm" in order:
        assert rows[0]["vs_torch_rms_norm"] == 2.0


def test_timed_flow_on_cpu_with_failing_alternatives(monkeypatch, device, tmp_path):  # noqa: ANN001
    """The whole CUDA flow on CPU. SDPA pinned to the efficient / cuDNN backend fails there (no CPU kernel),
    which must become an error row while the other implementations (SDPA flash has a CPU kernel) are still
    timed and compared."""
    if device.type != "cpu":
        pytest.skip("CPU-only behaviour")
    monkeypatch.setattr(bench, "_time_ms", _wall_clock)
    monkeypatch.setattr(bench, "_peak_mb", _fake_peak)
    kernels = ["attention", "swiglu", "fused_linear_ce"]
    rows = bench.run(kernels, [8, 16], heads=2, head_dim=16, dtype="fp32", device="cpu", kv_heads=1, timed=True,
                     skip=("flex",))  # compiling flex on CPU is slow  # fmt: skip
    assert {r["impl"] for r in rows} == {"triton", "eager", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"}
    triton = [r for r in rows if r["impl"] == "triton"]
    passes = {k: ("fwd+bwd",) if k == "fused_linear_ce" else ("fwd", "fwd+bwd") for k in kernels}
    assert [(r["kernel"], r["pass"]) for r in triton] == [(k, p) for k in kernels for _ in (8, 16) for p in passes[k]]
    for r in triton:
        assert r["ms"] > 0 and r["max_err"] < 1e-4 and r["vs_eager"] > 0, r
        assert (r["tflops"] is not None) == (r["kernel"] != "swiglu") and (r["gbps"] is not None) == (
            r["kernel"] == "swiglu"
        )  # fmt: skip
    failed = [r for r in rows if r["impl"] in ("sdpa_efficient", "sdpa_cudnn")]
    assert len(failed) == 8 and all(r["ms"] is None and "RuntimeError" in r["error"] for r in failed)
    assert all(r["vs_sdpa_flash"] > 0 and "vs_sdpa_cudnn" not in r for r in triton if r["kernel"] == "attention")
    assert {r["shape"] for r in rows if r["kernel"] == "attention"} == {"B1 H2/1 T8 D16", "B1 H2/1 T16 D16"}
    # The block sizes each attention row ran with (the autotuner's pick on a GPU; fixed under the interpreter).
    configs = {r["pass"]: r["config"] for r in triton if r["kernel"] == "attention"}
    assert configs["fwd"].startswith("fwd: BLOCK_M=") and "dq" not in configs["fwd"], configs
    assert "dkdv: BLOCK_M=" in configs["fwd+bwd"] and "dq: BLOCK_M=" in configs["fwd+bwd"], configs

    written = bench.write_outputs(rows, str(tmp_path / "out"), {"device": "test"})
    report = (tmp_path / "out" / "kernels.md").read_text()
    assert report.count("\n| attention |") == 4 and "sdpa_cudnn failed" in report and "Goals (from issue #6)" in report
    entry = bench.attention_table_entry(rows)  # the interpreter against CPU flash: no win expected, but computed
    assert ("without this card" in report) == (entry is None) and (f"with {entry} " in report) == (entry is not None)
    assert json.loads((tmp_path / "out" / "env.json").read_text()) == {"device": "test"}
    back = bench.read_csv(written["csv"])
    assert len(back) == len(rows) and back[0]["ms"] == pytest.approx(rows[0]["ms"]) and back[0]["seq"] == 8
    assert bench.markdown(back, {"device": "test"}) == report


@pytest.mark.parametrize("name", bench.KERNELS)
def test_every_alternative_computes_what_the_kernel_computes(name, device):  # noqa: ANN001
    """Apples to apples: each timed alternative (eager, SDPA per backend that runs here, F.rms_norm, ...) gives
    the reference's outputs and input gradients on the benchmark's own inputs (GQA for attention and RoPE)."""
    case = bench._case(name, 24, bench._sizes(24, 4, 16, device, kv_heads=2), torch.float32, device, flex=False)
    checked = []
    for impl, fn in case["alts"].items():
        try:
            err = bench._max_err(fn, case["ref"], case["inputs"])
        except RuntimeError as exc:  # a backend pinned where it has no kernel (e.g. cuDNN on CPU)
            assert impl.startswith("sdpa_") and "No viable backend" in str(exc), (impl, exc)
            continue
        assert err < 1e-4, (impl, err)
        checked.append(impl)
    assert "eager" in checked


def _attention_row(seq: int, **ratios: float) -> dict:
    return dict(kernel="attention", impl="triton", seq=seq, shape=f"T{seq}", ms=1.0, **{"pass": "fwd+bwd"},
                **{f"vs_{k}": v for k, v in ratios.items()})  # fmt: skip


def test_auto_attention_table_entry_needs_a_win_at_every_longer_length():
    rows = [_attention_row(1024, sdpa_flash=0.8, sdpa_cudnn=0.7), _attention_row(2048, sdpa_flash=1.1),
            _attention_row(4096, sdpa_flash=1.3, sdpa_efficient=2.0)]  # fmt: skip
    assert bench.attention_table_entry(rows) == 2048
    rows.append(_attention_row(8192, sdpa_flash=1.2, sdpa_cudnn=0.95))  # loses to cuDNN at the longest length
    assert bench.attention_table_entry(rows) is None
    assert bench.attention_table_entry([_attention_row(2048, eager=5.0)]) is None  # no SDPA measured


def test_goals_report_met_and_not_met():
    rows = [
        _attention_row(1024, sdpa_flash=0.5),  # below 2048: not part of the goal
        _attention_row(2048, sdpa_flash=1.2, sdpa_cudnn=0.9),
        dict(kernel="rms_norm", impl="triton", seq=1, shape="N1", ms=1.0, vs_eager=2.0, **{"pass": "fwd"}),
        dict(kernel="swiglu", impl="triton", seq=1, shape="N1", ms=1.0, vs_eager=1.4, **{"pass": "fwd+bwd"}),
        dict(kernel="fused_linear_ce", impl="triton", seq=1, shape="V", ms=1.0, vs_eager=0.95, mem_vs_eager=6.0,
             **{"pass": "fwd+bwd"}),
    ]  # fmt: skip
    lines = bench.goals(rows)
    assert lines[0].startswith("NOT MET: attention") and "T2048: 0.90x" in lines[0] and "T1024" not in lines[0]
    assert lines[1].startswith("NOT MET: rms_norm / rope / swiglu") and "lowest 1.40x (swiglu" in lines[1]
    assert lines[2].startswith("MET: fused cross-entropy") and "memory 6.0x lower, speed 0.95x" in lines[2]


def test_plot_draws_timed_rows(tmp_path):  # noqa: ANN001
    pytest.importorskip("matplotlib")
    rows = [dict(kernel="swiglu", impl=impl, seq=seq, shape=f"N{seq}", ms=ms * seq, **{"pass": "fwd"})
            for seq in (16, 32) for impl, ms in (("triton", 1.0), ("eager", 2.0))]  # fmt: skip
    path = tmp_path / "k.png"
    assert bench.plot(rows, str(path)) is True and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_entry(device, capsys, tmp_path):  # noqa: ANN001
    if device.type != "cpu":
        pytest.skip("keeps the CLI check cheap")
    out = tmp_path / "cli"
    status = bench.main(["--kernels", "swiglu", "--seq", "8,16", "--heads", "2", "--head-dim", "16",
                         "--dtype", "fp32", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert status == 0
    rows = bench.read_csv(str(out / "kernels.csv"))
    assert [r["shape"] for r in rows] == ["N8 F128", "N16 F128"] and all(r["max_err"] < 1e-5 for r in rows)
    printed = capsys.readouterr().out
    assert "swiglu" in printed and f"wrote csv: {out / 'kernels.csv'}" in printed
    assert bench.main(["--from-csv", str(out / "kernels.csv"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "kernels.md").read_text() == (out / "kernels.md").read_text()


REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_bench_table_splices_results_between_the_markers(monkeypatch, tmp_path):  # noqa: ANN001
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_table", REPO / "scripts" / "bench_table.py")
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text(f"# B\n\nbefore\n{bench_table.BEGIN}\nPending.\n{bench_table.END}\nafter\n")
    rows = [dict(kernel="swiglu", impl=impl, seq=seq, shape=f"N{seq}", ms=ms * seq, gbps=1.0, **{"pass": "fwd"},
                 **({"vs_eager": 2.0} if impl == "triton" else {}))
            for seq in (16, 32) for impl, ms in (("triton", 1.0), ("eager", 2.0))]  # fmt: skip
    bench.write_outputs(rows, str(tmp_path / "d64"), {"device": "Fake GPU"})
    (tmp_path / "d64" / "command.txt").write_text("python -m scaletrain.kernels.bench --heads 32\n")
    (tmp_path / "pytest.txt").write_text("....\n======= 40 passed, 2 skipped in 31.20s =======\n")
    argv = [str(doc), str(tmp_path / "d64"), "--tests", str(tmp_path / "pytest.txt")]
    bench_table.main(argv)
    text = doc.read_text()
    assert text.startswith("# B\n\nbefore\n") and text.endswith(f"{bench_table.END}\nafter\n") and "Pending" not in text
    assert "40 passed, 2 skipped in 31.20s" in text and "python -m scaletrain.kernels.bench --heads 32" in text
    assert "| swiglu | fwd | N32 |" in text and "NOT MET: rms_norm / rope / swiglu >= 1.5x eager" not in text
    assert "MET: rms_norm / rope / swiglu >= 1.5x eager — lowest 2.00x" in text
    if (tmp_path / "d64" / "kernels.png").exists():  # matplotlib installed
        assert (doc.parent / "img" / "kernels-d64.png").is_file() and "](img/kernels-d64.png)" in text
    bench_table.main(argv)
    assert doc.read_text() == text  # idempotent: the block is replaced, not appended


def test_gpu_bench_script_steps(tmp_path):  # noqa: ANN001
    import subprocess

    script = str(REPO / "scripts" / "gpu_bench.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    # The script runs `python3`: this interpreter's, as in an activated venv (CI), not whatever else is on PATH.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "BENCH_OUT": str(tmp_path), "PATH": path}
    bad = subprocess.run(["bash", script, "nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown step 'nope'" in bad.stderr
    if not torch.cuda.is_available():
        no_gpu = subprocess.run(["bash", script, "d64"], capture_output=True, text=True, env=env, timeout=120)
        assert no_gpu.returncode != 0 and "no CUDA device" in no_gpu.stderr
