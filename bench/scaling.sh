#!/usr/bin/env bash
# The 1.1B student of bench/throughput.py on 1 GPU, then on N GPUs of the same machine (FSDP2)
# with the default train.reshard_after_forward=auto (the 1.1B fits keeping every layer's gathered
# weights for the backward) and with true (gathered again in the backward). Prints tokens/s per
# GPU and the step's two halves for each; the scaling is N x (per-GPU on N) / (one GPU).
#   bash bench/scaling.sh [N] [extra throughput.py arguments]
set -uo pipefail
n=${1:-2}; shift || true
run="bash bench/run_device.sh"
$run python3 bench/throughput.py --seqs 2048 --steps 10 "$@"
$run torchrun --nproc-per-node "$n" bench/throughput.py --seqs 2048 --steps 10 "$@"
$run torchrun --nproc-per-node "$n" bench/throughput.py --seqs 2048 --steps 10 --set train.reshard_after_forward=true "$@"
