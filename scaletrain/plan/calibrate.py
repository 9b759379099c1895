"""`scaletrain plan CONFIG --calibrate`: the prediction for CONFIG's layout beside a real run of it on this
machine, component by component.

The layout is predicted (ranks.py: model state and activation peak of pipeline rank 0's first rank, and
step_time.py's step) and then trained for a few steps under torchrun with the trainer's own meters on: the
model-state census (model_state_gib, counted at a step boundary), the step-memory tracker
(metrics.step_memory: activation_peak_gib at the third step) and the step time of the steps after it. On a
GPU the peak is the datasheet's (scaletrain/metrics/device.py) and the run's max_memory_allocated is compared
with the predicted total too; on a CPU the peak is this CPU's measured matmul rate, one thread per rank as
the run uses, and communication is not predicted (gloo over loopback has no entry in the link table). The
ratio of predicted compute to measured step time is the efficiency to give `scaletrain plan --gpus`.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from scaletrain.config import load_config
from scaletrain.config.schema import TORCH_DTYPES, JobConfig
from scaletrain.metrics.device import lookup_spec
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parity import run_layout
from scaletrain.plan.memory import MIB, loader_index_bytes
from scaletrain.plan.ranks import plan_memory
from scaletrain.plan.search import model_facts
from scaletrain.plan.step_time import GPU, GPUS, step_time

MEASURED_STEP = 3  # the step the trainer's step-memory tracker measures; later ones are timed


def cpu_matmul_tflops(dtype: torch.dtype, size: int = 512, seconds: float = 0.5) -> float:
    """This CPU's dense matmul rate on one thread (each rank of the run gets one), in TFLOP/s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: first-call dispatch and allocation
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        return 2 * size**3 * runs / (time.perf_counter() - start) / 1e12
    finally:
        torch.set_num_threads(threads)


def local_gpu(cfg: JobConfig) -> GPU:
    """The device this machine trains on, as the step-time model sees it."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        spec = lookup_spec(name)
        if spec is None:
            raise ValueError(f"--calibrate: {name!r} has no peak in scaletrain/metrics/device.py's table")
        known = next((g for g in GPUS.values() if g.name == spec.name), None)
        if known is not None:
            return known
        # A card the planner's table lacks (e.g. an H100 PCIe): its datasheet peak and its memory, with the H100
        # row's links (a calibration run stays on this node).
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        return GPU(spec.name, memory, spec.bf16, spec.tf32 or spec.fp32, GPUS["h100"].intra_node_gbs,
                   GPUS["h100"].inter_node_gbs)  # fmt: skip
    rate = cpu_matmul_tflops(TORCH_DTYPES[cfg.train.dtype])
    infinite = float("inf")  # communication is not predicted on a CPU
    return GPU("this CPU (1 thread per rank)", 0.0, rate, rate, infinite, infinite)


def measured(rows: list[dict], cfg: JobConfig, on_gpu: bool) -> dict[str, float]:
    """The run's meters: model state (less the loader's order, which a CPU census counts), activation peak,
    the median time of the steps after the measured one, and on a GPU the peak allocation; in bytes / s."""
    state = next(r["model_state_gib"] for r in rows if "model_state_gib" in r) * 2**30
    if not on_gpu:
        state -= loader_index_bytes(cfg)
    timed = [r["step_time_s"] for r in rows if "step_time_s" in r and r.get("step", 0) > MEASURED_STEP]
    found = {
        "model state": state,
        "activations": next(r["activation_peak_gib"] for r in rows if "activation_peak_gib" in r) * 2**30,
        "step": statistics.median(timed),
    }
    if on_gpu:
        found["peak allocated"] = max(r.get("mem_gib") or 0.0 for r in rows) * 2**30
    return found


def calibrate(config: str, overrides: list[str], dims: ParallelDims, steps: int, jobs: int) -> int:
    if steps <= MEASURED_STEP:
        raise ValueError(f"--steps: {steps} is not allowed; use > {MEASURED_STEP} (step {MEASURED_STEP} is the one "
                         "measured for memory, the ones after it for time)")  # fmt: skip
    cfg = load_config(config, overrides)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and dims.world_size > (os.cpu_count() or 1):
        print(f"# warning: {dims.world_size} ranks on {os.cpu_count()} CPUs: step times include waiting for a core")
    start = time.perf_counter()
    rank0 = plan_memory(cfg, dims, jobs=jobs)[0]
    gpu = local_gpu(cfg)
    predicted_time = step_time(cfg, dims, gpu, dims.world_size, 1.0, model_facts(cfg))
    peak = gpu.fp32_tflops if cfg.train.dtype == "fp32" else gpu.bf16_tflops
    print(f"# predicted in {time.perf_counter() - start:.1f} s; training {steps} steps of {dims.describe()} on "
          f"{dims.world_size} ranks here ({gpu.name}, peak {peak:.3g} TFLOP/s)")  # fmt: skip
    run_overrides = [*overrides, "--train.steps", str(steps), "--train.log_interval", "1",
                     "--train.warmup_steps", str(min(cfg.train.warmup_steps, steps)),
                     "--metrics.step_memory", "true"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="scaletrain-calibrate-") as tmp:
        rows = run_layout(config, run_overrides, Path(tmp), "calibrate", dims.world_size)
    found = measured(rows, replace(cfg, train=replace(cfg.train, steps=steps)), on_gpu)
    lines = [("model state (MiB)", rank0.state.total / MIB, found["model state"] / MIB),
             ("activations (MiB)", rank0.activations / MIB, found["activations"] / MIB)]  # fmt: skip
    if on_gpu:
        lines.append(("peak allocated (MiB)", rank0.total / MIB, found["peak allocated"] / MIB))
    print(f"{'component':>22}  {'predicted':>10}  {'measured':>10}  predicted/measured")
    for name, p, m in lines:
        print(f"{name:>22}  {p:10.2f}  {m:10.2f}  {p / m:.3f}")
    t = predicted_time
    print(f"{'step time (s)':>22}  {t.step_s:10.4f}  {found['step']:10.4f}  {t.step_s / found['step']:.3f}   "
          f"(compute {t.compute_s:.4f}, FSDP {t.fsdp_s:.4f} of which exposed {t.exposed_fsdp_s:.4f}, "
          f"replicate {t.replicate_s:.4f}, TP {t.tp_s:.4f}, bubble {t.bubble:.2f})")  # fmt: skip
    print(f"# efficiency here: {t.step_s / found['step']:.2f} of the peak (predicted at 1.0 / measured); "
          "`scaletrain plan --gpus N --efficiency E` takes it")
    return 0
