"""Peak dense TFLOP/s of known accelerators, and MFU.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s. The peak comes from
`metrics.peak_tflops` when set, else from the table below, matched on the name that
`torch.cuda.get_device_name` reports (ROCm builds report AMD names through the same call).
An unknown device gives `None` and a hint — never a guessed default, because a wrong peak
silently makes every MFU number wrong.

All numbers are **dense** tensor-core TFLOP/s (vendor sheets print sparse numbers with an
asterisk; those are 2x the dense ones and are not reachable in training). Columns:

* bf16 / fp16 — with fp32 accumulate (what PyTorch matmuls use);
* tf32 — what fp32 training runs at when TF32 matmuls are allowed
  (`torch.set_float32_matmul_precision("high")` or `torch.backends.cuda.matmul.allow_tf32`);
* fp32 — plain fp32 (non-tensor, or AMD's fp32 matrix rate), used when TF32 is off.

`None` in a column means the chip has no such fast path (V100 has no bf16) or the sheet
does not give it; the lookup then says so instead of inventing a number.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch

HINT_SET_PEAK = "set metrics.peak_tflops to get MFU"


@dataclass(frozen=True)
class PeakSpec:
    """Dense peak TFLOP/s of one accelerator model, per dtype path."""

    name: str
    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float | None


# (regex searched in the device name, spec). Order matters: the first match wins, so the
# more specific names (H100 PCIe, L40S, A10G, MI250X) come before their prefixes.
# Sources (dense = sparse / 2 where the sheet gives sparse only):
_TABLE: list[tuple[str, PeakSpec]] = [
    # NVIDIA Blackwell. HGX B200 / GB200 NVL72 datasheets (2024-25), per GPU:
    # B200 BF16 4.5 PF sparse, TF32 2.2 PF sparse, FP32 75 TF (1000 W HGX part).
    # GB200 BF16 5 PF sparse, TF32 2.5 PF sparse, FP32 80 TF (1200 W superchip part).
    # B100 (700 W): BF16 3.5 PF sparse, TF32 1.75 PF sparse, FP32 60 TF.
    (r"\bGB200\b", PeakSpec("GB200", 2500.0, 2500.0, 1250.0, 80.0)),
    (r"\bB200\b", PeakSpec("B200", 2250.0, 2250.0, 1100.0, 75.0)),
    (r"\bB100\b", PeakSpec("B100", 1750.0, 1750.0, 875.0, 60.0)),
    # NVIDIA Hopper. H100 datasheet: SXM BF16/FP16 1,979 TF sparse, TF32 989 sparse, FP32 67;
    # PCIe BF16 1,513 sparse, TF32 756 sparse, FP32 51; NVL BF16 1,671 sparse, TF32 835
    # sparse, FP32 60. H200 datasheet: SXM same tensor rates as H100 SXM; NVL same as H100
    # NVL. GH200 datasheet: same Hopper GPU rates as H100 SXM. H800 is the export H100 with
    # unchanged tensor rates (SXM / PCIe). H20 datasheet: BF16 148 TF dense, TF32 74 TF.
    (r"\bH100\b.*\bPCIe\b", PeakSpec("H100 PCIe", 756.5, 756.5, 378.0, 51.0)),
    (r"\bH100\b.*\bNVL\b", PeakSpec("H100 NVL", 835.5, 835.5, 417.5, 60.0)),
    (r"\bH100\b", PeakSpec("H100 SXM", 989.5, 989.5, 494.5, 67.0)),
    (r"\bH200\b.*\bNVL\b", PeakSpec("H200 NVL", 835.5, 835.5, 417.5, 60.0)),
    (r"\bH200\b", PeakSpec("H200 SXM", 989.5, 989.5, 494.5, 67.0)),
    (r"\bGH200\b", PeakSpec("GH200", 989.5, 989.5, 494.5, 67.0)),
    (r"\bH800\b.*\bPCIe\b", PeakSpec("H800 PCIe", 756.5, 756.5, 378.0, 51.0)),
    (r"\bH800\b", PeakSpec("H800 SXM", 989.5, 989.5, 494.5, 67.0)),
    (r"\bH20\b", PeakSpec("H20", 148.0, 148.0, 74.0, 44.0)),
    # NVIDIA Ampere. A100 datasheet (SXM and PCIe, 40/80 GB): BF16/FP16 312 TF dense,
    # TF32 156 dense, FP32 19.5. A800 is the export A100, same rates. A10 datasheet: BF16
    # 125 dense, TF32 62.5 dense, FP32 31.2. A10G (AWS G5) has no public NVIDIA sheet; the
    # figures AWS gives and third parties repeat are BF16/FP16 70 TF, TF32 35 TF, FP32 35 TF.
    # A40 datasheet: BF16 149.7 dense, TF32 74.8, FP32 37.4. GA102 whitepaper, RTX 3090:
    # FP16/BF16 with FP32 accumulate 71 TF dense, TF32 35.6, FP32 35.6.
    (r"\bA100\b", PeakSpec("A100", 312.0, 312.0, 156.0, 19.5)),
    (r"\bA800\b", PeakSpec("A800", 312.0, 312.0, 156.0, 19.5)),
    (r"\bA10G\b", PeakSpec("A10G", 70.0, 70.0, 35.0, 35.0)),
    (r"\bA10\b", PeakSpec("A10", 125.0, 125.0, 62.5, 31.2)),
    (r"\bA40\b", PeakSpec("A40", 149.7, 149.7, 74.8, 37.4)),
    (r"\bRTX 3090\b(?! Ti)", PeakSpec("RTX 3090", 71.0, 71.0, 35.6, 35.6)),
    # NVIDIA Ada. L4 datasheet: BF16 242 sparse, TF32 120 sparse, FP32 30.3. L40S datasheet:
    # BF16 362.05 dense, TF32 183 dense, FP32 91.6. L40 datasheet: BF16 181.05 dense, TF32
    # 90.5 dense, FP32 90.5. Ada whitepaper, RTX 4090: FP16/BF16 with FP32 accumulate 165.2
    # dense, TF32 82.6 dense, FP32 82.6 (the 4090 D is a different, slower part).
    (r"\bL40S\b", PeakSpec("L40S", 362.05, 362.05, 183.0, 91.6)),
    (r"\bL40\b", PeakSpec("L40", 181.05, 181.05, 90.5, 90.5)),
    (r"\bL4\b", PeakSpec("L4", 121.0, 121.0, 60.0, 30.3)),
    (r"\bRTX 4090\b(?! D)", PeakSpec("RTX 4090", 165.2, 165.2, 82.6, 82.6)),
    # NVIDIA Volta / Turing: no bf16 or tf32 tensor cores. V100 datasheet: tensor 125 TF
    # (SXM2), 112 (PCIe), 130 (V100S PCIe); FP32 15.7 / 14 / 16.4. T4 datasheet: FP16
    # tensor 65 TF, FP32 8.1.
    (r"\bV100S\b", PeakSpec("V100S", None, 130.0, None, 16.4)),
    (r"\bV100\b.*\bPCIE\b", PeakSpec("V100 PCIe", None, 112.0, None, 14.0)),
    (r"\bV100\b", PeakSpec("V100 SXM2", None, 125.0, None, 15.7)),
    (r"\bT4\b", PeakSpec("T4", None, 65.0, None, 8.1)),
    # AMD Instinct. MI300X / MI325X datasheets: FP16/BF16 1307.4 TF dense, TF32 653.7,
    # FP32 matrix 163.4. MI250X datasheet: FP16/BF16 383 TF, FP32 matrix 95.7, no TF32.
    # MI250: FP16/BF16 362.1, FP32 matrix 90.5.
    (r"\bMI325X\b", PeakSpec("MI325X", 1307.4, 1307.4, 653.7, 163.4)),
    (r"\bMI300X\b", PeakSpec("MI300X", 1307.4, 1307.4, 653.7, 163.4)),
    (r"\bMI250X\b", PeakSpec("MI250X", 383.0, 383.0, None, 95.7)),
    (r"\bMI250\b", PeakSpec("MI250", 362.1, 362.1, None, 90.5)),
]


def lookup_spec(device_name: str) -> PeakSpec | None:
    """The table row whose pattern matches `device_name` (case-insensitive), or None."""
    for pattern, spec in _TABLE:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return spec
    return None


def _tf32_enabled() -> bool:
    """Whether fp32 matmuls may run on TF32 tensor cores (either PyTorch switch turns it on)."""
    with warnings.catch_warnings():
        # Newer torch deprecates `allow_tf32` in favour of `fp32_precision`; both still work.
        warnings.simplefilter("ignore")
        return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float = 0.0) -> tuple[float | None, str]:
    """Dense peak TFLOP/s of one `device` computing in `dtype`, and a short note on where it came from.

    `override` (metrics.peak_tflops) wins when > 0. Otherwise CUDA/ROCm devices are looked
    up by name; anything unknown — CPU, MPS, an unlisted GPU, a dtype the chip has no fast
    path for — returns `(None, hint)` so MFU shows as n/a rather than a wrong number.
    """
    if override > 0:
        return float(override), f"peak {override:g} TFLOP/s from metrics.peak_tflops"
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"no peak-FLOPs table for {device.type} devices; {HINT_SET_PEAK}"
    name = torch.cuda.get_device_name(device)
    spec = lookup_spec(name)
    if spec is None:
        return None, f"unknown GPU {name!r}; {HINT_SET_PEAK}"
    if dtype == torch.bfloat16:
        value, path = spec.bf16, "bf16"
    elif dtype == torch.float16:
        value, path = spec.fp16, "fp16"
    elif dtype == torch.float32:
        # fp32 training is really TF32 training when the tensor-core path is allowed.
        value, path = (
            (spec.tf32, "tf32 (fp32 compute on TF32 tensor cores)")
            if _tf32_enabled()
            else (spec.fp32, "fp32 (TF32 matmuls disabled)")
        )
    else:
        return None, f"no peak for dtype {dtype} on {spec.name}; {HINT_SET_PEAK}"
    if value is None:
        return None, f"{spec.name} has no dense {path.split()[0]} tensor peak in the table; {HINT_SET_PEAK}"
    return value, f"{spec.name} dense {path} peak {value:g} TFLOP/s (matched {name!r})"


def mfu(flops_per_step: float, step_time_s: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.41 = 41%).

    `flops_per_step` is the model FLOPs of one whole optimizer step summed over every
    device (per-micro-batch train FLOPs x accumulation steps x data-parallel replicas);
    `peak` is the per-device dense TFLOP/s. None when the peak is unknown or the time is
    not positive, so callers print n/a instead of dividing by zero.
    """
    if peak is None or peak <= 0 or step_time_s <= 0 or num_devices <= 0:
        return None
    return float(flops_per_step) / (step_time_s * num_devices * peak * 1e12)
