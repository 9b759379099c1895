"""Peak TFLOP/s lookup by device name, MFU arithmetic, peak memory."""

from __future__ import annotations

import pytest
import torch

from scaletrain.metrics import HINT_SET_PEAK, lookup_spec, mfu, peak_memory_gib, peak_tflops, reset_peak_memory
from scaletrain.metrics import device as device_mod

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def gpu_named(monkeypatch: pytest.MonkeyPatch):
    """Pretend cuda:0 is a GPU with the given name (only the name function is mocked)."""

    def set_name(name: str) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return set_name


@pytest.fixture
def tf32(monkeypatch: pytest.MonkeyPatch):
    def set_tf32(enabled: bool) -> None:
        monkeypatch.setattr(device_mod, "_tf32_enabled", lambda: enabled)

    return set_tf32


# Names as torch.cuda.get_device_name reports them on real machines.
@pytest.mark.parametrize(
    ("name", "table_name", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.5),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5),
        ("NVIDIA H200", "H200 SXM", 989.5),
        ("NVIDIA GH200 480GB", "GH200", 989.5),
        ("NVIDIA H800", "H800 SXM", 989.5),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0),
        ("NVIDIA A10G", "A10G", 70.0),
        ("NVIDIA A10", "A10", 125.0),
        ("NVIDIA L4", "L4", 121.0),
        ("NVIDIA L40S", "L40S", 362.05),
        ("NVIDIA L40", "L40", 181.05),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.2),
        ("NVIDIA B200", "B200", 2250.0),
        ("NVIDIA GB200", "GB200", 2500.0),
        ("AMD Instinct MI300X", "MI300X", 1307.4),
        ("AMD Instinct MI250X/MI250", "MI250X", 383.0),
    ],
)
def test_lookup_by_name(gpu_named, name: str, table_name: str, bf16: float) -> None:
    gpu_named(name)
    peak, note = peak_tflops(CUDA0, torch.bfloat16)
    assert peak == bf16
    assert table_name in note and name in note
    assert lookup_spec(name).name == table_name


def test_fp16_and_fp32_paths(gpu_named, tf32) -> None:
    gpu_named("NVIDIA A100-SXM4-40GB")
    assert peak_tflops(CUDA0, torch.float16)[0] == 312.0
    tf32(True)
    peak, note = peak_tflops(CUDA0, torch.float32)
    assert peak == 156.0 and "tf32" in note  # fp32 compute runs on TF32 tensor cores
    tf32(False)
    peak, note = peak_tflops(CUDA0, torch.float32)
    assert peak == 19.5 and "TF32 matmuls disabled" in note


def test_missing_dtype_path_is_none_not_a_guess(gpu_named, tf32) -> None:
    gpu_named("Tesla V100-SXM2-16GB")
    assert peak_tflops(CUDA0, torch.float16)[0] == 125.0
    peak, hint = peak_tflops(CUDA0, torch.bfloat16)  # Volta has no bf16 tensor cores
    assert peak is None and HINT_SET_PEAK in hint
    tf32(True)
    assert peak_tflops(CUDA0, torch.float32)[0] is None
    assert peak_tflops(CUDA0, torch.float64)[0] is None


@pytest.mark.parametrize("name", ["NVIDIA GeForce GTX 1080", "NVIDIA H20X", "Some Future Accelerator", ""])
def test_unknown_gpu_gives_hint(gpu_named, name: str) -> None:
    gpu_named(name)
    peak, hint = peak_tflops(CUDA0, torch.bfloat16)
    assert peak is None
    assert HINT_SET_PEAK in hint


@pytest.mark.parametrize("name", ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", "NVIDIA L40S", "NVIDIA A10G"])
def test_prefixes_do_not_shadow(name: str) -> None:
    # A100 must not be read as A10, L40S as L40 or L4, H100 PCIe as H100 SXM.
    spec = lookup_spec(name)
    assert spec is not None and spec.name == name.replace("NVIDIA ", "").split("-")[0]


def test_cpu_and_override() -> None:
    peak, hint = peak_tflops(torch.device("cpu"), torch.float32)
    assert peak is None and HINT_SET_PEAK in hint
    peak, note = peak_tflops(torch.device("cpu"), torch.float32, override=123.5)
    assert peak == 123.5 and "metrics.peak_tflops" in note


def test_mfu_arithmetic() -> None:
    # 8 GPUs at 400 TFLOP/s peak, 1.6e15 FLOPs per global step in 1.25 s -> 1.28e15 FLOP/s
    # achieved of 3.2e15 available = 40%.
    assert mfu(1.6e15, 1.25, 8, 400.0) == pytest.approx(0.4)
    assert mfu(1e12, 1.0, 1, 2.0) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 1, None) is None
    assert mfu(1e12, 0.0, 1, 100.0) is None


def test_cpu_peak_memory_tracks_allocations() -> None:
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    base = peak_memory_gib(cpu)
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched so it is resident
    assert float(block[-1]) == 1.0
    del block
    assert peak_memory_gib(cpu) >= base + 0.2
    assert peak_memory_gib(torch.device("meta")) != peak_memory_gib(torch.device("meta"))  # NaN: no counter
