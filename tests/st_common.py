"""Constants shared by the core tests (a module with a unique name: every test folder has its own conftest)."""

from __future__ import annotations

from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "scaletrain" / "recipes" / "gpt" / "configs" / "tiny.yaml")

# Small enough for many multi-process runs on 2 cores, big enough that every layout's
# code path (GQA, several blocks, accumulation) is exercised.
FAST = [
    "--train.steps",
    "5",
    "--train.warmup_steps",
    "2",
    "--model.n_layers",
    "2",
    "--data.seq_len",
    "64",
    "--train.global_batch_size",
    "8",
]


class KernelOps(TorchDispatchMode):
    """Records the names of the scaletrain_kernels ops dispatched inside the block (``.names``), so a test
    can tell that a fused path really ran the kernel rather than its plain-torch fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func.namespace == "scaletrain_kernels":
            self.names.add(func._opname)
        return func(*args, **(kwargs or {}))


# `scaletrain plan`'s model-state prediction against the census the trainer logs (model_state_gib: every
# tensor rank 0 holds at the second step's boundary: parameters, gradients, optimizer states, EMA, buffers).
MODEL_STATE_RTOL = 0.10


# The activation peak (activations and temporaries of the second step's forward and backward above the model
# state): `scaletrain plan`'s simulation of the step on fake tensors against the trainer's metrics.step_memory
# tracker on the real one. Observed ratios 0.92-1.00 (tensor parallel runs allocate a little more for real).
ACTIVATION_RTOL = 0.15
STEP_MEMORY = ["--metrics.step_memory", "true"]


def assert_model_state_predicted(
    config: str, overrides: list[str], rows: list[dict], activations: bool = False
) -> None:
    """The model-state prediction against the census; with `activations` (the run had STEP_MEMORY among its
    overrides) also the activation peak against the tracker's."""
    from scaletrain.config import load_config
    from scaletrain.plan.memory import loader_index_bytes, predict_model_state
    from scaletrain.plan.simulate import predict_activation_peak

    cfg = load_config(config, overrides)
    measured = next(r["model_state_gib"] for r in rows if "model_state_gib" in r) * 2**30
    predicted = predict_model_state(cfg)
    host = loader_index_bytes(cfg)  # on the CPU the census sees the loader's order too
    assert abs(predicted.total + host - measured) <= MODEL_STATE_RTOL * measured, (
        f"model state: predicted {predicted.total:,} B ({predicted}) + loader {host:,} B, measured {measured:,.0f} B"
    )
    if activations:
        measured = next(r["activation_peak_gib"] for r in rows if "activation_peak_gib" in r) * 2**30
        predicted = predict_activation_peak(cfg)
        assert abs(predicted - measured) <= ACTIVATION_RTOL * measured, (
            f"activation peak: predicted {predicted:,} B, measured {measured:,.0f} B"
        )
