#!/usr/bin/env bash
# The GPU checks of issue 7 in one call, for a session that has one CUDA GPU (H100/H200):
#   1. python -m distvgg.bench --device cuda            seed_loop vs distvgg_same vs distvgg_best (images/s)
#   2. the same with --compile                           (compile time reported apart)
#   3. python -m distvgg.bench --time-to-accuracy 0.88   the fast recipe: seconds of training until 88%
#   4. accelerate launch (accelerate_configs/gpu1.yaml) -m distvgg.train for EPOCHS epochs in fp32, fp16, bf16:
#      trains, evaluates, checkpoints, writes metrics; the fp16 run's skipped scaler steps are reported.
#
#   launch/gpu_check.sh OUT_DIR        (default: $OUT, else runs/gpu_check)
#
# Environment: DATASET (default ../shared/data/cifar10-jpeg), EPOCHS (3), TARGET (0.88), PYTHON (python3),
# RUNS_DIR (where the training runs' checkpoints and models go; default /tmp/distvgg_gpu_check: large files),
# SKIP_COMPILE=1 to skip step 2, REPORT_TO (none; wandb needs the wandb package, offline mode is used),
# MIXED_PRECISIONS ("no fp16 bf16"), BENCH_ARGS and TRAIN_ARGS (appended to every bench / train command).
# A plumbing check of this script on a CPU: DEVICE=cpu ACCEL_CONFIG=accelerate_configs/cpu.yaml
#   MIXED_PRECISIONS="no bf16" BENCH_ARGS=--tiny TRAIN_ARGS="--width 0.125 --train-limit 512" EPOCHS=1 ...
# OUT_DIR receives only a few small files (so a remote runner can bring them back): gpu_check.log,
# nvidia-smi.txt, bench_cuda.json, bench_cuda_compile.json, time_to_accuracy.json, summary.json.
#
# On a lent device machine (which only gets the repository): copy the dataset into an ignored folder of the
# checkout and carry it, e.g. `mkdir -p .gpu && cp -r ../shared/data/cifar10-jpeg .gpu/ && echo /.gpu/ >>
# .git/info/exclude`, carry [".gpu"], and run `DATASET=.gpu/cifar10-jpeg bash launch/gpu_check.sh "$OUT"`.
# If that machine's Python lacks `datasets`, carry its wheels in .gpu/wheels: they are installed from there.
# Every step runs even when an earlier one fails; the exit code is the number of failed steps.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
out="${1:-${OUT:-runs/gpu_check}}"
dataset="${DATASET:-../shared/data/cifar10-jpeg}"
epochs="${EPOCHS:-3}"
target="${TARGET:-0.88}"
py="${PYTHON:-python3}"
runs="${RUNS_DIR:-/tmp/distvgg_gpu_check}"
report_to="${REPORT_TO:-none}"
device="${DEVICE:-cuda}"
accel_config="${ACCEL_CONFIG:-accelerate_configs/gpu1.yaml}"
read -r -a bench_args <<<"${BENCH_ARGS:-}"
read -r -a train_args <<<"${TRAIN_ARGS:-}"
mkdir -p "$out" "$runs"
log="$out/gpu_check.log"
export WANDB_MODE="${WANDB_MODE:-offline}" DISTVGG_CACHE="${DISTVGG_CACHE:-$runs/cache}"
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, count failures
  local name="$1" limit="$2"; shift 2
  echo "=== $name: $*" | tee -a "$log"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  echo "$name $rc $((SECONDS - started))" >>"$runs/steps.txt"
}

: >"$log"; : >"$runs/steps.txt"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" | tee -a "$log"
if ! "$py" -c "import datasets" 2>/dev/null && [ -d .gpu/wheels ]; then
  step install-wheels 300 "$py" -m pip install --no-index --find-links .gpu/wheels datasets
fi
if [ "$device" = cuda ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to $py: nothing to check" | tee -a "$log"
  exit 1
fi

step bench 600 "$py" -m distvgg.bench --device "$device" --dataset "$dataset" --json "$out/bench_cuda.json" \
  "${bench_args[@]}"
if [ "${SKIP_COMPILE:-0}" != 1 ]; then
  step bench-compile 600 "$py" -m distvgg.bench --device "$device" --dataset "$dataset" --compile --repeats 3 \
    --json "$out/bench_cuda_compile.json" "${bench_args[@]}"
fi
step time-to-accuracy 600 "$py" -m distvgg.bench --device "$device" --dataset "$dataset" --no-throughput \
  --time-to-accuracy "$target" --json "$out/time_to_accuracy.json" "${bench_args[@]}"
for mp in ${MIXED_PRECISIONS:-no fp16 bf16}; do
  rm -rf "$runs/train_$mp"
  step "train-$mp" 600 "$py" -m accelerate.commands.launch --config_file "$accel_config" \
    --mixed_precision "$mp" -m distvgg.train --dataset "$dataset" --epochs "$epochs" --report-to "$report_to" \
    --log-every 100 --output-dir "$runs/train_$mp" "${train_args[@]}"
done

# One summary of every step: bench figures, time to accuracy, and per precision the last accuracy,
# the skipped fp16 scaler steps, images/s, and whether checkpoints and final/ were written.
"$py" - "$out" "$runs" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path

out, runs = Path(sys.argv[1]), Path(sys.argv[2])
summary = {"steps": [dict(zip(("name", "exit_code", "seconds"), line.split()))
                     for line in (runs / "steps.txt").read_text().splitlines()]}
for name in ("bench_cuda", "bench_cuda_compile", "time_to_accuracy"):
    path = out / f"{name}.json"
    if path.is_file():
        r = json.loads(path.read_text())
        keep = ("device", "seed_loop", "distvgg_same", "distvgg_best", "ratio_same_vs_seed", "ratio_best_vs_seed",
                "time_to_accuracy", "one_time_costs")
        summary[name] = {k: r[k] for k in keep if k in r}
        if "time_to_accuracy" in r:
            summary[name]["time_to_accuracy"] = {k: v for k, v in r["time_to_accuracy"].items() if k != "config"}
for mp in ("no", "fp16", "bf16"):
    run = runs / f"train_{mp}"
    if not run.is_dir():
        continue
    records = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    last = lambda key: next((r[key] for r in reversed(records) if key in r), None)
    summary[f"train_{mp}"] = {
        "eval_accuracy": last("eval/accuracy"), "train_images_per_second": last("summary/images_per_second"),
        "skipped_scaler_steps": last("train/skipped_steps"), "epochs_evaluated": sum("eval/accuracy" in r for r in records),
        "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else [],
        "final_model": (run / "final" / "model.safetensors").is_file()}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
for key in ("bench_cuda", "bench_cuda_compile"):
    b = summary.get(key, {})
    for loop in ("seed_loop", "distvgg_same", "distvgg_best"):
        if loop in b:
            print(f"{key:<20} {loop:<14} batch {b[loop]['batch_size']:>4} {b[loop]['precision']:<5} "
                  f"{b[loop]['images_per_second']:>12,.0f} images/s  first step {b[loop]['first_step_seconds']} s")
t = summary.get("time_to_accuracy", {}).get("time_to_accuracy")
if t:
    print(f"time to {t['target']}: {t['train_seconds_to_target']} s (epoch {t['epochs_to_target']}); "
          f"best {t['best_accuracy']} after {t['epochs']} epochs, {t['train_seconds_total']} s")
for mp in ("no", "fp16", "bf16"):
    if f"train_{mp}" in summary:
        print(f"train {mp:<5}", summary[f"train_{mp}"])
EOF
echo "failed steps: $failed (details in $log, summary in $out/summary.json)"
exit "$failed"
