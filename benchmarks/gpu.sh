#!/usr/bin/env bash
# The GPU benchmarks in one command, for the lent GPU machine (torch 2.11, transformers 5.17, no TRL,
# no datasets, no flash-attn, no network; 10 minutes a command):
#
#   bash benchmarks/gpu.sh
#
# 1. installs the project (`pip install --no-deps -e .`; falls back to running from src/);
# 2. notes the GPU, the versions and the attention kernels (gpu_info.txt);
# 3. runs the GPU tests (pytest -m gpu tests/backend/test_kernels.py tests/backend/test_attention.py: CUDA varlen
#    kernels vs the exact path);
# 4. `packcollate bench` with the llama-1b preset (Llama-3.2-1B-shaped, random init), bf16, 8 examples
#    a step, on the flan and orcamath length distributions (trl-bfd is skipped: no TRL there);
# 5. benchmarks/attention_step.py --device cuda --dtype bf16.
# JSON + PNG + logs go to benchmarks/results/<gpu name>/. With $OUT set (the device tool brings it
# back), the files this run made are copied there, flat: gpu_info.txt, 4 logs, 3 JSON, 2 PNG is 10,
# over the tool's 8, so the logs go to $OUT as one file, gpu.log: 7 files.
#
# Settings (environment variables, defaults in brackets):
#   STEPS [40] (or GPU_STEPS)  REPEATS [1] (or GPU_REPEATS)  WARMUP [3]  BATCH_SIZE [8]
#   PRESET [llama-1b]  DATASETS ["flan orcamath"]
#   BENCH_ARGS [""]      extra arguments for `packcollate bench` (e.g. "--modes padded,packcollate")
#   BENCH_TIMEOUT [200]  seconds allowed to each `packcollate bench` run
#   ATTN_BATCHES [6]  ATTN_REPEATS [3]  ATTN_TIMEOUT [60]   for attention_step.py
#   GPU_TESTS [1]  TESTS_TIMEOUT [90]                        0 skips the GPU tests
# With the defaults the benchmarks take a few minutes on an H100; the timeouts cap the whole script
# at 90 + 2 x 200 + 60 s plus the install, inside the 10-minute limit of one command.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

STEPS=${STEPS:-${GPU_STEPS:-40}}
WARMUP=${WARMUP:-3}
REPEATS=${REPEATS:-${GPU_REPEATS:-1}}
BATCH_SIZE=${BATCH_SIZE:-8}
PRESET=${PRESET:-llama-1b}
DATASETS=${DATASETS:-"flan orcamath"}
BENCH_ARGS=${BENCH_ARGS:-}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
ATTN_BATCHES=${ATTN_BATCHES:-6}
ATTN_REPEATS=${ATTN_REPEATS:-3}
ATTN_TIMEOUT=${ATTN_TIMEOUT:-60}
GPU_TESTS=${GPU_TESTS:-1}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-90}

# No network there: build isolation would try to download setuptools, so use the installed one.
python3 -m pip install -q --no-deps --no-build-isolation -e . \
    || python3 -m pip install -q --no-deps -e . \
    || echo "gpu.sh: pip install failed; running from src/ instead"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))") || {
    echo "gpu.sh: no CUDA device" >&2; exit 1; }
RESULTS="benchmarks/results/$GPU"
mkdir -p "$RESULTS"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    python3 -c "import torch, transformers; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}')"
    python3 -c "from packcollate.backend import describe; print(describe())"
} 2>&1 | tee "$RESULTS/gpu_info.txt"

failed=0
produced=("$RESULTS/gpu_info.txt")
logs=()
if [ "$GPU_TESTS" != 0 ]; then
    echo "== pytest -m gpu tests/backend/test_kernels.py tests/backend/test_attention.py"
    timeout "$TESTS_TIMEOUT" python3 -m pytest -q -m gpu tests/backend/test_kernels.py tests/backend/test_attention.py -p no:cacheprovider 2>&1 \
        | tee "$RESULTS/gpu_tests.log"
    status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || { echo "gpu.sh: GPU tests exited with $status" >&2; failed=1; }
    logs+=("$RESULTS/gpu_tests.log")
fi
for dataset in $DATASETS; do
    stem="train_throughput_${PRESET}_${dataset}"
    echo "== packcollate bench --preset $PRESET --dataset $dataset ($STEPS steps x $BATCH_SIZE examples)"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    timeout "$BENCH_TIMEOUT" python3 -m packcollate.tools.cli bench --preset "$PRESET" --dataset "$dataset" \
        --device cuda --dtype bf16 --batch-size "$BATCH_SIZE" --steps "$STEPS" --warmup "$WARMUP" \
        --repeats "$REPEATS" --out "$RESULTS" $BENCH_ARGS 2>&1 | tee "$RESULTS/$stem.log"
    status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || { echo "gpu.sh: bench on $dataset exited with $status" >&2; failed=1; }
    produced+=("$RESULTS/$stem.json" "$RESULTS/$stem.png")
    logs+=("$RESULTS/$stem.log")
done

echo "== benchmarks/attention_step.py --device cuda --dtype bf16"
timeout "$ATTN_TIMEOUT" python3 benchmarks/attention_step.py --device cuda --dtype bf16 \
    --batches "$ATTN_BATCHES" --repeats "$ATTN_REPEATS" --out "$RESULTS" 2>&1 | tee "$RESULTS/attention_step_bf16.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || { echo "gpu.sh: attention_step exited with $status" >&2; failed=1; }
produced+=("$RESULTS/attention_step_bfloat16.json")  # attention_step.py names it by torch dtype
logs+=("$RESULTS/attention_step_bf16.log")

if [ -n "${OUT:-}" ]; then
    for file in "${produced[@]}"; do
        [ -f "$file" ] && cp "$file" "$OUT/"
    done
    for file in "${logs[@]}"; do
        [ -f "$file" ] && { echo "===== $(basename "$file")"; cat "$file"; }
    done > "$OUT/gpu.log"
fi
echo "gpu.sh: results in $RESULTS${OUT:+ (copied to \$OUT, logs joined in gpu.log)}"
exit "$failed"
