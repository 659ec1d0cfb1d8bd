#!/usr/bin/env bash
# Train on all GPUs of this machine with DDP over NCCL.
#   launch/gpus.sh --dataset data/cifar10
# Environment: NGPUS (default: all visible GPUs), MIXED_PRECISION (bf16|fp16|no, default bf16),
# PORT (rendezvous port, default 29500).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
ngpus="${NGPUS:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$ngpus" -lt 1 ]; then echo "launch/gpus.sh: no GPU visible; use launch/cpu.sh" >&2; exit 2; fi
mp="${MIXED_PRECISION:-bf16}"
cfg="$here/accelerate_configs/gpus_bf16.yaml"; [ "$mp" = fp16 ] && cfg="$here/accelerate_configs/gpus_fp16.yaml"
exec accelerate launch --config_file "$cfg" --num_processes "$ngpus" --mixed_precision "$mp" \
  --main_process_port "${PORT:-29500}" -m distvgg.train "$@"
