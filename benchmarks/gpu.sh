#!/usr/bin/env bash
# GPU checks, one script: compiled-kernel tests, then benchmarks, each under its own time limit.
#
#   bash benchmarks/gpu.sh            # outputs under $OUT if set, else benchmarks/out/
#
# Needs a CUDA GPU and a Python with torch, triton and pytest (no network). Worst case, every
# step at its limit, is 7.5 minutes; expect about 4 on an H100. A failing or timed-out step is
# recorded in summary.txt and the script goes on; the exit status is 1 if any step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/out}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
# Compiled kernels, not Triton's CPU interpreter.
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # silences a Triton 3.9 warning
status=0

# run NAME SECONDS COMMAND...: output to $OUT_DIR/NAME.txt, status line to summary.txt.
run() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "ok      $name ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
    else
        if [ "$rc" -eq 124 ]; then rc="124 (timed out after ${limit} s)"; fi
        echo "FAILED  $name: exit $rc ($((SECONDS - start)) s), see $name.txt" | tee -a "$SUMMARY"
        status=1
    fi
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    git rev-parse HEAD 2>/dev/null || true
} > "$OUT_DIR/machine.txt" 2>&1 || true
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"

# 1. Kernels compiled for this GPU against float64 (tolerance tables in tests/logprob_cases.py),
#    including a realistic vocabulary (V = 32000) with the default heuristics.
run kernel_tests 150 python -m pytest -q -ra tests/test_kernels.py tests/test_logprobs.py tests/test_losses.py

# 2. Plain vs chunked vs Triton at Mistral-7B's D and V, bf16, frozen and trainable output weight.
run bench_logprobs 120 python benchmarks/bench_logprobs.py --dtype bf16 --n 2048 8192 16384 --d 4096 \
    --v 32000 --matmul-rate

# 3. Triton tile/chunk alternatives at N = 8192 (frozen, bf16): what kernels/heuristics.py should pick.
run sweep_logprobs 60 python benchmarks/bench_logprobs.py --sweep --dtype bf16 --d 4096 --v 32000 --repeat 5

# --- issue 4: one LoRA SPL training step at Mistral-7B's shape (benchmarks/bench_gpu_step.py) -----
# Random bf16 weights made on the GPU, LoRA r16 on all projections, activation checkpointing, 8 pairs
# of 512 tokens, reference pass included: tokens/s, MFU, peak memory -> $OUT_DIR/gpu_step.md.
# Needs ~25 GiB of GPU memory; about 1-1.5 min on an H100 (Triton autotuning in the 2 warm-up steps).
# This adds 150 s to the worst case above.
run gpu_step 120 python benchmarks/bench_gpu_step.py --out "$OUT_DIR"
# --- end issue 4 -----------------------------------------------------------------------------------

# More benchmarks: add `run NAME SECONDS COMMAND...` lines here, keeping the sum of limits < 8 min.

echo "outputs in $OUT_DIR"
exit "$status"
