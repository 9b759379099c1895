#!/usr/bin/env bash
# Benchmark the fused kernels on one NVIDIA GPU and produce docs/benchmarks.md's GPU kernel table.
#
#   bash scripts/gpu_bench.sh                 # the quick set, one device call of about 8 minutes (estimated,
#                                             # not yet timed): tests, d128 at SEQ=2048,8192, plan, then the table
#   bash scripts/gpu_bench.sh tests d64 d128  # the full kernel set (~15 min on an H100: two 10-minute calls)
#   BENCH_OUT=/some/dir SEQ=1024,2048 bash scripts/gpu_bench.sh d128
#
# Steps (results under $BENCH_OUT, default runs/gpu-bench):
#   tests  pytest tests/kernels on CUDA: the same kernel-vs-reference tests the CPU suite runs in the Triton
#          interpreter, now through the compiled kernels -> tests/pytest.txt
#   d64    attention only, bf16, Llama-3.2-1B heads (32 query / 8 kv heads, head dim 64)      -> d64/
#   d128   every kernel, bf16, Llama-3-8B shapes (32 / 8 heads, head dim 128; RMSNorm over 4096; SwiGLU
#          over 16384; fused cross-entropy at vocab 128256, width 4096)                       -> d128/
#   plan   scaletrain plan --calibrate on llama-1b (seq 2048, global batch 8, 6 steps) under activation
#          checkpointing none / selective / full: predicted vs measured model state, activations, peak
#          allocated and step time, each capped at 150 s                                       -> plan/
#   table  splice d64/ and d128/ (kernels.md, kernels.png) and the test summary into docs/benchmarks.md
#          between its gpu-kernels markers; needs no GPU (python3 scripts/bench_table.py ...)
# Each benchmark folder holds kernels.csv (every row), kernels.md (table + the issue's goals, MET / NOT MET,
# and the scaletrain.ops.TRITON_ATTENTION_FASTER entry for model.attention=auto), kernels.png, env.json and
# bench.log. Sequence lengths: $SEQ (default 1024,2048,4096,8192); batch = 16384 // seq.
#
# On the lent GPU machine (15 minutes of device time in all; only files under its $OUT come back):
#   run (timeout_s 540): BENCH_OUT=$OUT PYTHONUNBUFFERED=1 bash scripts/gpu_bench.sh
# then here: python3 scripts/bench_table.py docs/benchmarks.md <d128 dir> --tests <pytest.txt>, and copy
# plan/calibrate-*.txt's lines into docs/benchmarks.md and docs/planning.md
# and commit docs/benchmarks.md + docs/img/. If a card's row says to, add its entry to
# scaletrain/ops.py TRITON_ATTENTION_FASTER.
#
# Works from the checkout without installing (PYTHONPATH), with the torch/Triton already there (tested
# against torch 2.11 + Triton 3.6 and torch 2.13 + Triton 3.9).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BENCH_OUT=${BENCH_OUT:-runs/gpu-bench}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then  # the quick set: one device call
  steps=(tests d128 plan table)
  SEQ=${SEQ:-2048,8192}
fi
SEQ=${SEQ:-1024,2048,4096,8192}

need_gpu() {
  "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "scripts/gpu_bench.sh: no CUDA device (the table step alone needs none)")'
}

bench() {  # bench NAME ARGS...: one scaletrain.kernels.bench run into $BENCH_OUT/NAME
  local name=$1
  shift
  mkdir -p "$BENCH_OUT/$name"
  echo "python -m scaletrain.kernels.bench $* --dtype bf16 --seq $SEQ" >"$BENCH_OUT/$name/command.txt"
  "$PYTHON" -m scaletrain.kernels.bench "$@" --dtype bf16 --seq "$SEQ" --out "$BENCH_OUT/$name" 2>&1 | tee "$BENCH_OUT/$name/bench.log"
}

for step in "${steps[@]}"; do
  echo "== gpu_bench: $step"
  case "$step" in
    tests)
      need_gpu
      mkdir -p "$BENCH_OUT/tests"
      # Not fatal: the benchmark still runs, and the table shows the failures.
      "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$BENCH_OUT/tests/pytest.txt" || true
      ;;
    d64)
      need_gpu
      bench d64 --kernels attention --heads 32 --kv-heads 8 --head-dim 64
      ;;
    d128)
      need_gpu
      bench d128 --heads 32 --kv-heads 8 --head-dim 128
      ;;
    plan)
      need_gpu
      mkdir -p "$BENCH_OUT/plan"
      for ac in none selective full; do
        # Not fatal: a layout that does not fit or times out is itself a result.
        timeout 150 "$PYTHON" -m scaletrain.cli plan scaletrain/recipes/gpt/configs/llama-1b.yaml --calibrate \
          --steps 6 --data.seq_len 2048 --train.global_batch_size 8 --train.compile false \
          --activation_checkpoint.mode "$ac" 2>&1 | tee "$BENCH_OUT/plan/calibrate-$ac.txt" || true
      done
      ;;
    table)
      args=()
      for name in d64 d128; do [ -f "$BENCH_OUT/$name/kernels.md" ] && args+=("$BENCH_OUT/$name"); done
      [ -f "$BENCH_OUT/tests/pytest.txt" ] && args+=(--tests "$BENCH_OUT/tests/pytest.txt")
      "$PYTHON" scripts/bench_table.py docs/benchmarks.md "${args[@]}"
      ;;
    *)
      echo "scripts/gpu_bench.sh: unknown step '$step' (choose from tests d64 d128 plan table)" >&2
      exit 2
      ;;
  esac
done
