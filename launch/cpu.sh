#!/usr/bin/env bash
# Train on the CPU: 1 process by default, NPROC=2 (or more) for gloo DDP.
#   launch/cpu.sh --dataset data/cifar10 --epochs 1
# Environment: NPROC (processes, default 1), PORT (rendezvous port, default 29500).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
nproc="${NPROC:-1}"
if [ "$nproc" -gt 1 ]; then
  # The torchrun launcher with gloo on the CPU (a MULTI_CPU config would start one process without MPI).
  export ACCELERATE_USE_CPU=true
  exec accelerate launch --config_file "$here/accelerate_configs/cpu_ddp2.yaml" --num_processes "$nproc" \
    --main_process_port "${PORT:-29500}" -m distvgg.train "$@"
fi
exec accelerate launch --config_file "$here/accelerate_configs/cpu.yaml" -m distvgg.train "$@"
