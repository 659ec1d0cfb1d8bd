#!/usr/bin/env bash
# Train on one GPU (the first visible one; set CUDA_VISIBLE_DEVICES to pick another).
#   launch/gpu1.sh --dataset data/cifar10 [--mixed-precision bf16]
# Environment: MIXED_PRECISION (no|fp16|bf16, default: the config's "no").
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exec accelerate launch --config_file "$here/accelerate_configs/gpu1.yaml" \
  --mixed_precision "${MIXED_PRECISION:-no}" -m distvgg.train "$@"
