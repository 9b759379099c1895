"""Compile the LayerNorm kernels for an H100 (sm_90) exactly as scaletrain/kernels/layer_norm.py launches them on CUDA,
without a GPU, through test_gpu_compile.py's recorder and Triton's NVIDIA backend (down to a cubin).

The interpreter checks the math but not what only the compiler sees: constexpr branches that define names used
later, loop-carried accumulator types over a runtime trip count, int64 row offsets, and the [BLOCK_M, BLOCK_N]
tile shapes. Cases: GPT-style bf16 x [64, 4096] with weight and bias (one row per tile), DiT-XL-style bf16
modulate x [4, 16, 1152] without affine (width not a power of two), and fp32 x [64, 384] with weight, modulate
and bias all on (8-row tiles). Each case compiles the forward and the backward kernel.
"""

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

    return "scaletrain.kernels.layer_norm", run


def _main() -> None:
    from test_gpu_compile import compile_cases

    compile_cases(CASES, _calls)


@pytest.fixture(scope="module")
def results() -> dict:
    from test_gpu_compile import compile_results

    return compile_results(__file__)


@pytest.mark.parametrize("case", CASES)
def test_layer_norm_kernels_compile_for_sm90(results, case):  # noqa: ANN001
    from test_gpu_compile import _check

    _check(results[case], expected_launches=2)  # forward, backward


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _main()
