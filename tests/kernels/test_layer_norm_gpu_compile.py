"""Compile the LayerNorm kernels for an H100 (sm_90) exactly as kernels/layer_norm.py launches them on CUDA,
without a GPU, through test_gpu_compile.py's recorder and Triton's NVIDIA backend (down to a cubin).

The interpreter checks the math but not what only the compiler sees: constexpr branches that define names used
later, loop-carried accumulator types over a runtime trip count, int64 row offsets, and the [BLOCK_M, BLOCK_N]
tile shapes. Cases: GPT-style bf16 x [64, 4096] with weight and bias (one row per tile), DiT-XL-style bf16
modulate x [4, 16, 1152] without affine (width not a power of two), and fp32 x [64, 384] with weight, modulate
and bias all on (8-row tiles). Each case compiles the forward and the backward kernel.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = ["gpt-bf16-4096", "dit-bf16-1152-modulate", "fp32-384-all"]


def _calls(case: str):  # noqa: ANN202
    import torch

    if case == "gpt-bf16-4096":
        x, w = torch.empty(64, 4096, dtype=torch.bfloat16), torch.empty(4096, dtype=torch.bfloat16)
        b, shift, scale = w, None, None
    elif case == "dit-bf16-1152-modulate":
        x, w, b = torch.empty(4, 16, 1152, dtype=torch.bfloat16), None, None
        shift = scale = torch.empty(4, 1152, dtype=torch.bfloat16)
    else:
        x, w = torch.empty(4, 16, 384), torch.empty(384)
        b, shift, scale = w, torch.empty(4, 384), torch.empty(4, 384)
    stats = torch.empty(x.shape[:-1])

    def run(m) -> None:  # noqa: ANN001
        m.layer_norm_fwd(x, w, b, shift, scale, 1e-6)
        m.layer_norm_bwd(x, x, w, b, scale, stats, stats)

    return "kernels.layer_norm", run


def _main() -> None:
    from test_gpu_compile import _capture, _compile

    results = {}
    for case in CASES:
        try:
            launches = _capture(*_calls(case))
            results[case] = {"launches": len(launches), "shared": [_compile(k, a, dict(kw)) for k, a, kw in launches]}
        except Exception as exc:  # noqa: BLE001 - reported per case to the test
            results[case] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    print("RESULTS" + json.dumps(results))


@pytest.fixture(scope="module")
def results() -> dict:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_layer_norm.py compiles and runs the kernels for real")
    try:
        import triton.backends.compiler  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton or its NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULTS"))


@pytest.mark.parametrize("case", CASES)
def test_layer_norm_kernels_compile_for_sm90(results, case):  # noqa: ANN001
    from test_gpu_compile import _check

    _check(results[case], expected_launches=2)  # forward, backward


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _main()
