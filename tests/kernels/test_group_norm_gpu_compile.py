"""Compile the GroupNorm kernels for an H100 (sm_90) exactly as scaletrain/kernels/group_norm.py launches them on CUDA,
without a GPU, through test_gpu_compile.py's recorder and Triton's NVIDIA backend (down to a cubin).

The interpreter checks the math but not what only the compiler sees: the loop-carried fp32 scalars of the
Welford merge, constexpr branches that define names used later (weight / bias / SiLU), nested loops with runtime
bounds, jit helpers returning tuples, int64 offsets and the [BLOCK_R, BLOCK_C, BLOCK_S] tile shapes. The launch
layout is chosen for an H100's program count (4 x 132 SMs). Cases: a U-Net-style bf16 x [2, 512, 64, 64] with 32
groups, bf16 weight and bias and the SiLU (64 groups of 16 channels x 4096 positions, fewer than the SMs: each
group split into two programs of 2048 positions, so the statistics + normalize forward and the reduce + dx
backward, four kernels); the same at [16, 512, 32, 32] (512 whole groups, one pass each way: [1, 4, 1024] tiles,
several per program); a bf16 x [64, 64, 8, 8] with 32 groups (2 x 64 elements per group, packed two to a tile);
an fp32 x [2, 12, 5, 7] with 3 groups and the SiLU (odd sizes, masked [1, 4, 64] tiles); and a bf16 1-D
x [4, 64, 300] with 8 groups and neither affine nor SiLU.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CASES = {  # case -> launches: 4 with groups split over programs (2 forward, 2 backward), else 2
    "unet-bf16-2x512x64x64-silu-split": 4,
    "unet-bf16-16x512x32x32-silu": 2,
    "bf16-8x8-packed-groups-silu": 2,
    "fp32-12x5x7-g3-silu": 2,
    "bf16-1d-no-affine": 2,
}
H100_PROGRAMS = 4 * 132  # num_programs_hint on an H100 (132 SMs); the recorder's CPU tensors would give 4


def _calls(case: str):  # noqa: ANN202
    import torch

    if case.startswith("unet-bf16-"):
        shape = (2, 512, 64, 64) if case.endswith("split") else (16, 512, 32, 32)
        x, groups, silu = torch.empty(shape, dtype=torch.bfloat16), 32, True
        w = b = torch.empty(512, dtype=torch.bfloat16)
    elif case == "bf16-8x8-packed-groups-silu":
        x, groups, silu = torch.empty(64, 64, 8, 8, dtype=torch.bfloat16), 32, True
        w = b = torch.empty(64, dtype=torch.bfloat16)
    elif case == "fp32-12x5x7-g3-silu":
        x, groups, silu = torch.empty(2, 12, 5, 7), 3, True
        w = b = torch.empty(12)
    else:
        x, groups, silu, w, b = torch.empty(4, 64, 300, dtype=torch.bfloat16), 8, False, None, None
    stats = torch.zeros(x.shape[0], groups)

    def run(m) -> None:  # noqa: ANN001
        m._target_programs = lambda device: H100_PROGRAMS
        m.group_norm_fwd(x, w, b, groups, 1e-5, silu)
        m.group_norm_bwd(x, x, w, b, stats, stats, groups, silu)

    return "scaletrain.kernels.group_norm", run


def _main() -> None:
    from test_gpu_compile import compile_cases

    compile_cases(CASES, _calls)


@pytest.fixture(scope="module")
def results() -> dict:
    from test_gpu_compile import compile_results

    return compile_results(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_group_norm_kernels_compile_for_sm90(results, case):  # noqa: ANN001
    from test_gpu_compile import _check

    _check(results[case], expected_launches=CASES[case])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _main()
