"""Compile every kernel for an H100 (sm_90) exactly as the wrappers launch it on CUDA, without a GPU.

The interpreter checks the math but not what only the compiler sees (dtype promotion, loop-carried types,
shared-memory budget of the GPU block configs, tensor-core dot shapes). Here the ops run with a recorder
in place of the launcher and ``INTERPRET`` switched off, so the real GPU configs are chosen; each captured
launch is then compiled by Triton's NVIDIA backend all the way to a cubin, with the specializations a real
launch gets (16-byte-aligned pointers and ints divisible by 16 marked so, ints equal to 1 made constants):
without them Triton cannot prove the loads aligned, does not pipeline them, and allocates far less shared
memory than the launch on a GPU will.

Attention is compiled twice per case: with its fixed configs (SCALETRAIN_ATTENTION_AUTOTUNE=0) and with
every config of its autotune space that survives the space's own pruning for that call. Configs pruned for
shared memory are compiled too, to show they really would not fit; each compiled config's shared memory is
checked against the 227 KB budget and against ``shared_mem_estimate`` (which the pruning trusts: it must
never be below what Triton allocates).

This runs in a subprocess without TRITON_INTERPRET: in an interpreting process the kernels are
InterpretedFunctions and the interpreter's patches of ``tl`` break real compilation. The ~110 distinct
compiles (~1-5 s each) run in up to 4 forked worker processes: ~70 s on 2 cores. Skipped when the NVIDIA
backend / ptxas is unavailable; on a GPU machine the other test files run the kernels for real.
"""

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
H100_SHARED_MEM = 227 * 1024
ATTENTION_CASES = {  # id -> (dtype, head_dim, causal, window)
    "bf16-D128-causal-window": ("bfloat16", 128, True, 64),
    "fp16-D64-noncausal": ("float16", 64, False, 0),
    "fp32-D64-causal": ("float32", 64, True, 0),
}
TUNED_KERNELS = ("fwd", "dkdv", "dq")
OTHER_CASES = [
    "rms_norm",
    "swiglu",
    "rope",
    "rope_",
    "fused_linear_ce",
    "ce_shard_stats",
    "ce_shard_grad_",
]  # LayerNorm: test_layer_norm_gpu_compile.py (through _capture / _compile here)
AUTOTUNE_ENV = "SCALETRAIN_ATTENTION_AUTOTUNE"


# ---------------------------------------------------------------- subprocess side (no interpreter)
def _capture(module_name: str, call, autotune: bool = True) -> list:  # noqa: ANN001
    module = importlib.import_module(module_name)
    captured: list = []

    class Recorder:
        def __init__(self, kernel) -> None:  # noqa: ANN001
            self.kernel = kernel

        def __getitem__(self, grid):  # noqa: ANN001
            return lambda *args, **kwargs: captured.append((self.kernel, args, kwargs))

    module.launch = Recorder
    module.INTERPRET = False  # make the wrappers pick their GPU block configs
    before = os.environ.get(AUTOTUNE_ENV)
    os.environ[AUTOTUNE_ENV] = "1" if autotune else "0"
    try:
        call(module)
    finally:
        if before is None:
            del os.environ[AUTOTUNE_ENV]
        else:
            os.environ[AUTOTUNE_ENV] = before
    return captured


def _specialize(kernel, args: tuple, kwargs: dict):  # noqa: ANN001, ANN202
    """Signature, constants and attributes as Triton's launcher derives them from these arguments."""
    import torch

    types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64"}
    names = list(inspect.signature(kernel.fn).parameters)
    signature, attrs = {}, {}
    constexprs = {(names.index(k),): v for k, v in kwargs.items()}
    for i, (name, value) in enumerate(zip(names, args, strict=False)):
        specialize = not kernel.params[i].do_not_specialize
        if isinstance(value, torch.Tensor):
            signature[name], aligned = types[value.dtype], value.data_ptr() % 16 == 0
        elif isinstance(value, bool) or not isinstance(value, int):
            signature[name], aligned = "fp32" if isinstance(value, float) else "u1", False
        elif value == 1 and specialize:
            signature[name], constexprs[(i,)] = "constexpr", 1
            continue
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            aligned = specialize and value % 16 == 0
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({k: "constexpr" for k in kwargs})
    return signature, constexprs, attrs


def _compile(kernel, args: tuple, kwargs: dict) -> int:  # noqa: ANN001
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constexprs, attrs = _specialize(kernel, args, kwargs)
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return compile(source, target=GPUTarget("cuda", 90, 32), options=options).metadata.shared


def _calls(case: str):  # noqa: ANN202
    import torch

    if case in ATTENTION_CASES:
        dtype_name, d, causal, window = ATTENTION_CASES[case]
        dtype = getattr(torch, dtype_name)
        q, kv = torch.empty(2, 8, 256, d, dtype=dtype), torch.empty(2, 2, 256, d, dtype=dtype)
        lse = torch.empty(2, 8, 256)

        def attn(m) -> None:  # noqa: ANN001
            m.attention_fwd(q, kv, kv, 0.1, causal, window)
            m.attention_bwd(q, q, kv, kv, q, lse, lse, 0.1, causal, window)

        return "scaletrain.kernels.attention", attn
    x = torch.empty(64, 4096, dtype=torch.bfloat16)
    if case == "rms_norm":
        rstd = torch.empty(64)
        return "scaletrain.kernels.rms_norm", lambda m: (
            m.rms_norm_fwd(x, x[0], 1e-6),
            m.rms_norm_bwd(x, x, x[0], rstd),
        )
    if case == "swiglu":
        return "scaletrain.kernels.swiglu", lambda m: (m.swiglu_fwd(x, x), m.swiglu_bwd(x, x, x))
    if case in ("rope", "rope_"):
        q, angles = torch.empty(2, 16, 32, 128, dtype=torch.bfloat16), torch.empty(16, 64)
        if case == "rope_":
            return "scaletrain.kernels.rope", lambda m: (
                m.rope_(q, angles, angles, False),
                m.rope_(q, angles, angles, True),
            )
        return "scaletrain.kernels.rope", lambda m: m.rope(q, q[:, :, :8], angles, angles, False)
    logits, targets = torch.empty(8, 32000, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.int64)
    if case == "ce_shard_stats":
        return "scaletrain.kernels.fused_linear_ce", lambda m: m.cross_entropy_shard_stats(logits, targets, 16000)
    if case == "ce_shard_grad_":
        lse = torch.empty(8)
        return "scaletrain.kernels.fused_linear_ce", lambda m: m.cross_entropy_shard_grad_(
            logits, targets, lse, torch.ones(1), 16000, -100, 1e-4
        )
    return "scaletrain.kernels.fused_linear_ce", lambda m: m.cross_entropy_chunk_(
        logits, targets, torch.ones(1), -100, 1e-4, True
    )


def _config_kwargs(config) -> dict:  # noqa: ANN001
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _label(config) -> str:  # noqa: ANN001
    kw = _config_kwargs(config)
    return f"M{kw['BLOCK_M']}-N{kw['BLOCK_N']}-w{kw['num_warps']}-s{kw['num_stages']}"


def _tuned_jobs(case: str) -> tuple[list, dict]:
    """Compile jobs for every surviving autotune config (and every one pruned for shared memory)."""
    import torch

    module = importlib.import_module("scaletrain.kernels.attention")
    dtype_name, d, _, _ = ATTENTION_CASES[case]
    elem = getattr(torch, dtype_name).itemsize
    names = {id(module.autotuned_kernel(k)): k for k in TUNED_KERNELS}
    jobs, meta = [], {}
    for tuner, args, kwargs in _capture(*_calls(case)):
        if id(tuner) not in names:
            continue  # the (untuned) preprocess kernel
        kernel = names[id(tuner)]
        survivors = tuner.early_config_prune(tuner.configs, dict(zip(tuner.arg_names, args, strict=False)), **kwargs)
        labels = {_label(c) for c in survivors}
        over = [c for c in tuner.configs if _estimate(module, kernel, c, d, elem) > H100_SHARED_MEM]
        if elem == 4:
            over = []  # fp32 is never tuned (pruned to its fixed config); its configs take seconds each
        meta[kernel] = {"space": len(tuner.configs), "survivors": sorted(labels)}
        for c in [*survivors, *(c for c in over if _label(c) not in labels)]:
            group = "survivors" if _label(c) in labels else "over_estimate"
            info = {"config": _label(c), "estimate": _estimate(module, kernel, c, d, elem), "group": group}
            jobs.append(((case, "tuned", kernel, info), tuner.fn, args, {**kwargs, **_config_kwargs(c)}))
    return jobs, meta


def _estimate(module, kernel: str, config, d: int, elem: int) -> int:  # noqa: ANN001
    kw = _config_kwargs(config)
    return module.shared_mem_estimate(kernel, kw["BLOCK_M"], kw["BLOCK_N"], d, elem, kw["num_stages"])


_JOBS: list = []  # (kernel, args, kwargs) of each distinct compile; filled before the worker processes fork


def _run_job(index: int):  # noqa: ANN202
    kernel, args, kwargs = _JOBS[index]
    try:
        return _compile(kernel, args, kwargs), None
    except Exception as exc:  # noqa: BLE001 - reported per case to the test
        return None, f"{type(exc).__name__}: {exc}"[-3000:]


def _main() -> None:
    import multiprocessing

    results: dict = {}
    tagged: list = []  # (tag, job index): a fixed attention config is often also an autotune survivor
    index: dict = {}

    def add(tag: tuple, kernel, args: tuple, kwargs: dict) -> None:  # noqa: ANN001
        kw = dict(kwargs)
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        key = (id(kernel), repr((*_specialize(kernel, args, kw), sorted(options.items()))))
        if key not in index:
            index[key] = len(_JOBS)
            _JOBS.append((kernel, args, kwargs))
        tagged.append((tag, index[key]))

    for case in [*ATTENTION_CASES, *OTHER_CASES]:
        try:
            launches = _capture(*_calls(case), autotune=False)
            results[case] = {"launches": len(launches), "shared": []}
            for kernel, args, kwargs in launches:
                add((case, "fixed", None, None), kernel, args, kwargs)
            if case in ATTENTION_CASES:
                jobs, results[case]["tuned"] = _tuned_jobs(case)
                for tag, kernel, args, kwargs in jobs:
                    add(tag, kernel, args, kwargs)
        except Exception as exc:  # noqa: BLE001
            results[case] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    workers = max(1, min(4, os.cpu_count() or 1))
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            done = pool.map(_run_job, range(len(_JOBS)), chunksize=1)
    else:
        done = [_run_job(i) for i in range(len(_JOBS))]
    for (case, kind, kernel, info), job in tagged:
        shared, error = done[job]
        result = results[case]
        if error is not None:
            result.setdefault("error", error)
        elif kind == "fixed":
            result["shared"].append(shared)
        else:
            result["tuned"][kernel].setdefault("compiled", []).append({**info, "shared": shared})
    print(f"{len(_JOBS)} compiles for {len(tagged)} launches/configs", file=sys.stderr)
    print("RESULTS" + json.dumps(results))


def compile_cases(cases, calls) -> None:  # noqa: ANN001
    """Subprocess side of a per-kernel compile test: capture each case's launches (``calls(case)`` gives the
    module name and a function that calls its wrappers), compile them for sm_90 and print one RESULTS line."""
    results = {}
    for case in cases:
        try:
            launches = _capture(*calls(case))
            results[case] = {"launches": len(launches), "shared": [_compile(k, a, dict(kw)) for k, a, kw in launches]}
        except Exception as exc:  # noqa: BLE001 - reported per case to the test
            results[case] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    print("RESULTS" + json.dumps(results))


# ---------------------------------------------------------------- pytest side
def compile_results(script: str, timeout: int = 300) -> dict:
    """Run a compile test's `script` in a process without the interpreter; its RESULTS as a dict.

    Skips where the test means nothing: on a GPU (the kernel tests run the kernels for real there) or
    without Triton's NVIDIA backend.
    """
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the other kernel tests compile and run the kernels for real")
    try:
        import triton.backends.compiler  # noqa: F401
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton or its NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", AUTOTUNE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 warning; 1 is the current default
    proc = subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULTS"))


@pytest.fixture(scope="module")
def results() -> dict:
    return compile_results(__file__, timeout=600)


def _check(result: dict, expected_launches: int | None = None) -> None:
    if "error" in result and "ptxas" in result["error"].lower() and "error:" not in result["error"].lower():
        pytest.skip(f"ptxas unavailable: {result['error'][:200]}")
    assert "error" not in result, result.get("error")
    if expected_launches is not None:
        assert result["launches"] == expected_launches
    assert result["launches"] > 0 and len(result["shared"]) == result["launches"], result
    assert all(0 <= s <= H100_SHARED_MEM for s in result["shared"]), result


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_fixed_configs_compile_for_sm90(results, case):  # noqa: ANN001
    _check(results[case], expected_launches=4)  # fwd, preprocess, dK/dV, dQ


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_autotune_space_compiles_for_sm90(results, case):  # noqa: ANN001
    """Every surviving config fits in 227 KB; every config that does not fit was pruned; the estimate the
    pruning trusts is never below Triton's allocation."""
    _check(results[case], expected_launches=4)
    for kernel in TUNED_KERNELS:
        tuned = results[case]["tuned"][kernel]
        compiled = tuned["compiled"]
        survivors = [c for c in compiled if c["group"] == "survivors"]
        assert survivors and len(survivors) == len(tuned["survivors"]), tuned
        for c in compiled:
            assert c["shared"] <= c["estimate"], f"{kernel} {c}: estimate below Triton's allocation"
            if c["shared"] > H100_SHARED_MEM:
                assert c["group"] != "survivors", f"{kernel} {c} does not fit but survived pruning"
        assert all(c["shared"] <= H100_SHARED_MEM for c in survivors), tuned
        over = [c for c in compiled if c["group"] == "over_estimate"]
        print(
            f"{case} {kernel}: {len(survivors)}/{tuned['space']} configs survive, max shared "
            f"{max(c['shared'] for c in survivors) / 1024:.1f} KB; pruned for shared memory: "
            + (", ".join(f"{c['config']} ({c['shared'] / 1024:.0f} KB)" for c in over) or "none")
        )


@pytest.mark.parametrize("case", OTHER_CASES)
def test_other_kernels_compile_for_sm90(results, case):  # noqa: ANN001
    _check(results[case])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _main()
