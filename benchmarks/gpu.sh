#!/usr/bin/env bash
# GPU checks, one script: correctness first (run side by side), then benchmarks (one at a time).
#
#   bash benchmarks/gpu.sh [quick]     # outputs under $GPU_OUT, else $OUT, else benchmarks/out/
#
# Needs a CUDA GPU and a Python with torch, triton, pytest and transformers (no network), and a
# Mistral v1 tokenizer.model at $SPL_TOKENIZER (mistral-common ships one; default .gpu/tokenizer.model.v1).
# "quick" runs every path once on smaller sizes (bring-up); without it, the full tables.
# $GPU_BUDGET (seconds, default 480) bounds the whole script: each step's limit is cut to what is
# left, and a step with under 20 s left is recorded as skipped. A failing, timed-out or skipped step
# is recorded in summary.txt and the script goes on; the exit status is 1 if any step failed.
# Seen on an H200 (2026-11-27): correctness ~100 s side by side, then ~5 min of benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${GPU_OUT:-${OUT:-benchmarks/out}}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
MODE="${1:-full}"
TOKENIZER="${SPL_TOKENIZER:-.gpu/tokenizer.model.v1}"
DEADLINE=$((SECONDS + ${GPU_BUDGET:-480}))
# Compiled kernels, not Triton's CPU interpreter.
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # silences a Triton 3.9 warning
export PYTHONUNBUFFERED=1
status=0

# run NAME SECONDS COMMAND...: output to $OUT_DIR/NAME.txt, status line to summary.txt.
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "SKIPPED $name: out of time (GPU_BUDGET)" | tee -a "$SUMMARY"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1 || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "ok      $name ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
    else
        if [ "$rc" -eq 124 ]; then rc="124 (timed out after ${limit} s)"; fi
        echo "FAILED  $name: exit $rc ($((SECONDS - start)) s), see $name.txt" | tee -a "$SUMMARY"
        return 1
    fi
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv || true
    python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
    python -c "import transformers; print('transformers', transformers.__version__)" || true
    git rev-parse HEAD 2>/dev/null || true
} > "$OUT_DIR/machine.txt" 2>&1 || true
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1

if [ "$MODE" = quick ]; then
    NS="8192"; VS="32000 128256"; REPEAT=3; GEN_REPEATS=1; QUICK=--quick
else
    NS="2048 8192"; VS="32000 128256"; REPEAT=5; GEN_REPEATS=2; QUICK=
fi

# --- Correctness, side by side (small GPU work; no timings are taken here) ------------------------
# 1. Kernels compiled for this GPU against float64 (tolerance tables in tests/logprob_cases.py).
run kernel_tests 150 python -m pytest -q -ra -p no:cacheprovider tests/test_kernels.py tests/test_logprobs.py \
    tests/test_losses.py tests/test_model.py &
p1=$!
# 2. bf16 accuracy of every log-prob path against float64 at Mistral-7B shapes.
run logprob_accuracy 150 python benchmarks/bench_logprobs.py --check --dtype bf16 --n 2048 --d 4096 \
    --v 32000 128256 &
p2=$!
# 3. torchrun train.py over NCCL: DDP (LoRA) and FSDP2 (full, DCP), resume, shipped configs, export.
# shellcheck disable=SC2086
run trainer_check 240 python benchmarks/trainer_gpu_check.py --tokenizer "$TOKENIZER" --out "$OUT_DIR" $QUICK &
p3=$!
for p in $p1 $p2 $p3; do wait "$p" || status=1; done

# --- Benchmarks, one at a time ----------------------------------------------------------------------
# 4. Plain vs chunked vs Triton at D = 4096, bf16, frozen and trainable output weight, matmul floor.
# shellcheck disable=SC2086
run bench_logprobs 150 python benchmarks/bench_logprobs.py --dtype bf16 --n $NS --d 4096 --v $VS \
    --repeat "$REPEAT" --matmul-rate || status=1
if [ "$MODE" != quick ]; then
    # ... and the other real vocabularies (Mistral v0.3 32768, Gemma 256000) at N = 8192.
    run bench_logprobs_more_v 90 python benchmarks/bench_logprobs.py --dtype bf16 --n 8192 --d 4096 \
        --v 32768 256000 --repeat "$REPEAT" --matmul-rate || status=1
fi
# 5. One LoRA SPL step at Mistral-7B's shape (8 pairs x 512 tokens, reference pass included).
run gpu_step 100 python benchmarks/bench_gpu_step.py --out "$OUT_DIR" || status=1
if [ "$MODE" != quick ]; then
    run gpu_step_no_checkpointing 100 python benchmarks/bench_gpu_step.py --no-checkpointing \
        --out "$OUT_DIR" || status=1
    # configs/ultrafeedback_spl.yaml's step: LoRA r64, 4 pairs x 1024 tokens.
    run gpu_step_ultrafeedback 100 python benchmarks/bench_gpu_step.py --pairs 4 --prompt-len 512 \
        --response-len 512 --lora-rank 64 --name gpu_step_ultrafeedback.md --out "$OUT_DIR" || status=1
fi
# 6. Generation: ours vs transformers (dynamic and static cache, compile off), Mistral-7B shape, bf16.
run generate 150 python benchmarks/bench_generate.py --repeats "$GEN_REPEATS" \
    --out "$OUT_DIR/generate.md" || status=1
if [ "$MODE" != quick ]; then
    # 7. Chunk sizes and kept vs recomputed logits for the log-prob path (spl_kernels/heuristics.py).
    run sweep_logprobs 60 python benchmarks/bench_logprobs.py --sweep --dtype bf16 --n 8192 --d 4096 \
        --v 32000 128256 --repeat 3 || status=1
    # 8. torch.compile of our decode step (compile time reported separately); last: it may run out of time.
    run generate_compile 150 python benchmarks/bench_generate.py --no-hf --compile --repeats 1 \
        --out "$OUT_DIR/generate_compile.md" || status=1
fi

echo "outputs in $OUT_DIR"
exit "$status"
