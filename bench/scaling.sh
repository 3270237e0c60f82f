#!/usr/bin/env bash
# The 1.1B student of bench/throughput.py on 1 GPU, then on N GPUs of the same machine (FSDP2),
# with the per-layer gathers kept for the backward (train.reshard_after_forward=false) and
# without. Prints tokens/s per GPU for each; the scaling is N x (per-GPU on N) / (one GPU).
#   bash bench/scaling.sh [N] [extra throughput.py arguments]
set -uo pipefail
n=${1:-2}; shift || true
run="bash bench/run_device.sh"
$run python3 bench/throughput.py --seqs 2048 --steps 10 "$@"
$run torchrun --nproc-per-node "$n" bench/throughput.py --seqs 2048 --steps 10 "$@"
$run torchrun --nproc-per-node "$n" bench/throughput.py --seqs 2048 --steps 10 --set train.reshard_after_forward=false "$@"
