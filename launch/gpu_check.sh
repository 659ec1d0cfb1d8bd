#!/usr/bin/env bash
# Check and measure distvgg's GPU path on one CUDA GPU within one time budget (one 8-minute call, start-up
# included), writing OUT_DIR/summary.json after every step; the most informative steps first:
#   sync           training steps under torch.cuda.set_sync_debug_mode("error") between log points, then the same
#                  with the EMA update and mixup
#   fast-recipe    --recipe fast end to end: accuracy per epoch, training seconds to 88%, the run's time split
#                  (training, compilation, evaluation, saving, logging, other) and a profiler trace of 5 steps
#   bench          python -m distvgg.bench on the GPU (images/s of the guide's loop and distvgg's)
#   fp16-overflow  an fp16 scaler forced to overflow: its skipped steps are counted
#   train-no, train-fp16, train-bf16   accelerate launch (accelerate_configs/gpu1.yaml) -m distvgg.train
#   compile        the same with --compile (skipped, with the reason, without a C compiler or Python headers)
#
#   launch/gpu_check.sh [OUT_DIR]          (default: $OUT, else runs/gpu_check)
#
# A step that runs out of time is ended with its whole process group. Every step imports this checkout's
# distvgg. Environment: DATASET (a local copy, default data/cifar10; a Hub-layout parquet copy is read with
# pyarrow when `datasets` is missing), BUDGET (seconds for all steps, default 390), DEVICE (cuda; cpu runs the
# same steps with a tiny network as a plumbing check, as CI does), RUNS_DIR (training outputs, default
# /tmp/distvgg_gpu_check), PYTHON (python3). Exit code: the number of failed steps.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here" || exit 2
out="${1:-${OUT:-runs/gpu_check}}"
device="${DEVICE:-cuda}"
config=accelerate_configs/gpu1.yaml
[ "$device" = cpu ] && config=accelerate_configs/cpu.yaml
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-offline}" DISTVGG_CACHE="${DISTVGG_CACHE:-${RUNS_DIR:-/tmp/distvgg_gpu_check}/cache}"
mkdir -p "$out"
if [ "$device" = cuda ]; then nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true; fi
exec "${PYTHON:-python3}" launch/gpu_check.py --out "$out" --dataset "${DATASET:-data/cifar10}" --device "$device" \
  --budget "${BUDGET:-390}" --accelerate-config "$config"
