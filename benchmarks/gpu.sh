#!/usr/bin/env bash
# The GPU part of packcollate in one command, for a lent H100/H200 (torch 2.11, transformers 5.17, no TRL):
#
#   bash benchmarks/gpu.sh
#
# 1. installs packcollate without touching the image's packages (pip --no-deps -e .);
# 2. runs the GPU tests (CUDA varlen kernels against the exact path, a packed bf16 model);
# 3. benchmarks one training step of a tiny Llama (padded sdpa / transformers packed / packcollate);
# 4. benchmarks training throughput and peak memory of a Llama-3.2-1B-shaped model (bf16, random init)
#    on FLAN-like and OrcaMath-like lengths, 8 examples per step.
# Raw logs and JSON land in benchmarks/results/<gpu name>/ and, when $OUT is set, flat in $OUT.
# Step counts (keep the whole script inside 10 minutes): GPU_STEPS (default 12), GPU_REPEATS (default 2).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
STEPS="${GPU_STEPS:-12}"
REPEATS="${GPU_REPEATS:-2}"

python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python3 -m pip install -q --no-deps -e .
NAME=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
RESULTS="benchmarks/results/$NAME"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu_info.txt"
python3 -c "import packcollate.attention as a; print(a.describe())" | tee -a "$RESULTS/gpu_info.txt"

status=0
python3 -m pytest -q -m gpu tests/test_attention.py -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.log" || status=1
python3 benchmarks/attention_step.py --device cuda --dtype bf16 --out "$RESULTS" 2>&1 | tee "$RESULTS/attention_step.log" || status=1
for dataset in flan orcamath; do
    python3 benchmarks/train_throughput.py --preset llama-1b --dataset "$dataset" --batch-size 8 \
        --steps "$STEPS" --repeats "$REPEATS" --out "$RESULTS" 2>&1 | tee "$RESULTS/train_throughput_$dataset.log" || status=1
done

if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/*.log "$RESULTS"/*.json "$RESULTS"/gpu_info.txt "$OUT"/ 2>/dev/null
fi
exit $status
