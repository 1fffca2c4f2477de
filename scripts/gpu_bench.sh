#!/usr/bin/env bash
# The one prepared GPU check of issue 6 (benchmark), for one H200: ≤ 8 minutes wall in total.
#
#   bash scripts/gpu_bench.sh                 # on the GPU machine; results under $OUT
#   SFC_BENCH_DRY=1 bash scripts/gpu_bench.sh # CPU dry run at a tiny size (checks the script)
#
# Parts, each under its own `timeout` so one slow part cannot eat the budget (seconds):
#   1. CUDA tests (pytest -m cuda; since issue 17 also one bf16 step per stage)  80
#   2. all five stages, faithful sizes (1280×720 / 1024×512), fp32            110
#   3. the same in bf16 autocast + channels_last + the proposed foreach SGD   100
#   4. release-style reference vs project (SFC stage one, SFM), fp32           60
#   5. loaders: native-size synthetic tree, 1 worker and 8 workers              60
#   6. --compile default: SFC stage one, fp32 (its compilation in the warm-up)    70
# (limits sum to 480 s; parts 1-5 took about 5 minutes on 2026-12-04). $OUT (default
# save_results/gpu_bench) gets at most 7 files (the device tool returns 8):
# bench_{fp32,bf16,reference,loaders,compile}.json,
# run.log (everything printed) and summary.txt (environment, part status, all tables).
# No pip installs: the repo runs from PYTHONPATH.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/save_results/gpu_bench}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

if [[ "${SFC_BENCH_DRY:-0}" == "1" ]]; then
  # CPU dry run: tiny backbone and images, one iteration — exercises every command below.
  DEV=(--device cpu --threads 1)
  SIZE=(--size 64 32 --layers 1 1 1 1 --width 8)
  ITERS=(--iters 1 --warmup 0 --eval-images 1)
  REF_ITERS=(--iters 1 --warmup 0)
  LOADER=(--loader-samples 1 --loader-workers 2)
  T=(60 120 120 60 120 240)
  PYTEST_MARK="cuda and not slow"
  [[ -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]] && PY="$ROOT/.venv/bin/python"
else
  DEV=(--device cuda --cudnn-benchmark)
  SIZE=()  # CUDA default: the faithful 1280×720 source, 1024×512 target, ResNet-101
  ITERS=(--iters 5 --warmup 3 --eval-images 4)
  REF_ITERS=(--iters 3 --warmup 1)
  LOADER=(--loader-samples 8 --loader-workers 8)
  T=(80 110 100 60 60 70)
  PYTEST_MARK="cuda"
fi

STATUS=()
LOG="$OUT/run.log"
: > "$LOG"
part() {  # part NAME TIMEOUT_S CMD... — run with a timeout, append to run.log, keep going
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "=== [$name] (limit ${limit}s) $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local msg="$name: rc=$rc ($((SECONDS - t0)) s)"
  [[ $rc -eq 124 || $rc -eq 137 ]] && msg="$msg TIMED OUT"
  echo "=== $msg" | tee -a "$LOG"
  STATUS+=("$msg")
}

echo "gpu_bench: $(date -Is) in $ROOT -> $OUT"
ENV="$("$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1)
$(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null)
$(nproc) CPU cores"
echo "$ENV" | tee -a "$LOG"

if "$PY" -c "import pytest" 2>/dev/null; then
  part tests_cuda "${T[0]}" "$PY" -m pytest -q -m "$PYTEST_MARK" tests -p no:cacheprovider
else  # no pytest there: at least the exactness check of the proposed foreach SGD
  part tests_cuda "${T[0]}" "$PY" -m sfc.bench.fastopt "${DEV[1]}"
fi
part bench_fp32 "${T[1]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${ITERS[@]}" \
  --precision fp32 --json "$OUT/bench_fp32.json"
part bench_bf16 "${T[2]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${ITERS[@]}" \
  --precision bf16 --channels-last --foreach-sgd --json "$OUT/bench_bf16.json"
part reference "${T[3]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${REF_ITERS[@]}" \
  --stages --reference --json "$OUT/bench_reference.json"
part bench_compile "${T[5]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${ITERS[@]}" \
  --precision fp32 --compile default --stages segnet_sfc --no-flops --eval-images 0 \
  --json "$OUT/bench_compile.json"
# Loaders: the workers needed are computed from the bf16 step times just measured.
part loaders "${T[4]}" "$PY" -m sfc.bench "${DEV[@]}" --stages --loaders "${LOADER[@]}" \
  --steps-from "$OUT/bench_bf16.json" "$OUT/bench_fp32.json" --json "$OUT/bench_loaders.json"

{
  echo "gpu_bench finished $(date -Is)"
  echo "$ENV"
  printf '%s\n' "${STATUS[@]}"
  for f in "$OUT"/bench_*.md; do
    [[ -f "$f" ]] && { echo; echo "## $(basename "$f" .md)"; cat "$f"; rm -f "$f"; }
  done
} | tee "$OUT/summary.txt"
