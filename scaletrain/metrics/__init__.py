"""Training metrics: FLOP counting, peak TFLOP/s and MFU, memory, throughput, and loggers."""

from scaletrain.metrics.device import HINT_SET_PEAK, PeakSpec, lookup_spec, mfu, peak_tflops
from scaletrain.metrics.flops import count_forward_flops, count_train_flops
from scaletrain.metrics.logger import MetricLogger, to_hwc_uint8
from scaletrain.metrics.memory import live_tensor_bytes, peak_memory_gib, reset_peak_memory
from scaletrain.metrics.sinks import MissingDependencyError, format_progress
from scaletrain.metrics.throughput import Throughput

__all__ = [
    "HINT_SET_PEAK",
    "MetricLogger",
    "MissingDependencyError",
    "PeakSpec",
    "Throughput",
    "count_forward_flops",
    "count_train_flops",
    "format_progress",
    "live_tensor_bytes",
    "lookup_spec",
    "mfu",
    "peak_memory_gib",
    "peak_tflops",
    "reset_peak_memory",
    "to_hwc_uint8",
]
