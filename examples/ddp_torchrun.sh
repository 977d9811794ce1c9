#!/usr/bin/env bash
# DDP with torchrun: 2 processes (gloo on CPU, NCCL on GPU), token-budget batches, padded-equivalent loss.
#   bash examples/ddp_torchrun.sh [--steps 10] [--max-tokens 2048]
# NPROC=4 bash examples/ddp_torchrun.sh   # more processes
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m torch.distributed.run --nproc_per_node "${NPROC:-2}" --master_port "${MASTER_PORT:-29541}" \
    accelerate_loop.py --processes "${NPROC:-2}" "$@"
