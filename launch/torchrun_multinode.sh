#!/usr/bin/env bash
# This machine's share of a run over several machines, without SLURM. Run the same line on every
# machine, changing only NODE_RANK (0 on the machine whose address is MASTER_ADDR):
#
#   machine 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun_multinode.sh --dataset DIR --output-dir runs/x
#   machine 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun_multinode.sh --dataset DIR --output-dir runs/x
#
# Arguments go to distvgg.train (or MODULE). Environment:
#   NNODES          number of machines (required)
#   NODE_RANK       this machine's rank, 0..NNODES-1 (required)
#   MASTER_ADDR     address or host name of machine 0, reachable from all machines (required)
#   MASTER_PORT     a free TCP port on machine 0 (default 29500)
#   NPROC_PER_NODE  processes on this machine (default: its GPUs; 1 on a machine without GPU)
#   CONFIG          accelerate config (default accelerate_configs/multinode.yaml with GPUs,
#                   accelerate_configs/cpu_2machines.yaml without)
#   MIXED_PRECISION no|fp16|bf16 (default: the config's)
#   MODULE          the Python module to run (default distvgg.train; e.g. your own wrapper of distvgg.train.main)
# Every machine needs the same code, the same options and the dataset (decoded once per machine
# into the node-local cache); --output-dir should be on a shared file system so that a relaunch
# of any machine finds the checkpoints (only the main process of machine 0 writes there).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"

missing=()
for v in NNODES NODE_RANK MASTER_ADDR; do [ -n "${!v:-}" ] || missing+=("$v"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "launch/torchrun_multinode.sh: set ${missing[*]} (see the comment at the top of this script)" >&2
  exit 2
fi
for v in NNODES NODE_RANK ${NPROC_PER_NODE:+NPROC_PER_NODE} ${MASTER_PORT:+MASTER_PORT}; do
  if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
    echo "launch/torchrun_multinode.sh: $v=${!v} is not a whole number" >&2
    exit 2
  fi
done
if [ "$NNODES" -lt 1 ] || [ "$NODE_RANK" -ge "$NNODES" ]; then
  echo "launch/torchrun_multinode.sh: NODE_RANK=$NODE_RANK is not in 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2
  exit 2
fi

gpus_here=""
if [ -z "${NPROC_PER_NODE:-}" ] || [ -z "${CONFIG:-}" ]; then
  gpus_here="$(python3 -c 'import torch; print(torch.cuda.device_count())')"
fi
nproc="${NPROC_PER_NODE:-$gpus_here}"
[ "$nproc" -ge 1 ] || nproc=1  # a machine without GPU: one CPU process (gloo)
if [ -z "${CONFIG:-}" ]; then
  CONFIG="$here/accelerate_configs/multinode.yaml"
  [ "$gpus_here" -ge 1 ] || CONFIG="$here/accelerate_configs/cpu_2machines.yaml"
fi

cmd=(accelerate launch --config_file "$CONFIG"
     --num_machines "$NNODES" --machine_rank "$NODE_RANK"
     --main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}"
     --num_processes "$((NNODES * nproc))")
[ -z "${MIXED_PRECISION:-}" ] || cmd+=(--mixed_precision "$MIXED_PRECISION")
cmd+=(-m "${MODULE:-distvgg.train}" "$@")
echo "machine $NODE_RANK of $NNODES: ${cmd[*]}" >&2
exec "${cmd[@]}"
