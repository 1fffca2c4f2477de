#!/usr/bin/env bash
# The one prepared GPU check of issue 6 (benchmark), for one H200: ≤ 8 minutes wall in total.
#
#   bash scripts/gpu_bench.sh                 # on the GPU machine; results under $OUT
#   SFC_BENCH_DRY=1 bash scripts/gpu_bench.sh # CPU dry run at a tiny size (checks the script)
#
# Parts, each under its own `timeout` so one slow part cannot eat the budget (seconds):
#   1. CUDA tests (pytest -m cuda -x: --cuda-graph in lockstep with the eager iteration and
#      its engine run without syncs, the s2b convolution, the stacked forwards — never run
#      on a GPU, so first — then a bf16 step per stage kind, the no-sync deferred checks) 65
#   2. all five stages, faithful sizes (1280×720 / 1024×512), fp32, deferred checks
#      (--check-every 50, the CUDA default): FLOPs, evaluation (4 images in one batch of 4,
#      --val-batch-size, and one at a time), profiler counts                                110
#   3. the backbone's dilated convolutions, native against space-to-batch (sfc.bench.convs:
#      one convolution of layer3 / layer4 per input size, fp32, fp32 without TF32 — the cost
#      of --tf32 off — and bf16)                                                            25
#   4. the same four SegNet/Accel stage kinds with --cuda-graph (the whole iteration as one
#      CUDA graph), the two SFC kinds first, each apart and with its target forwards stacked
#      in one batch (--stack-forwards; a limit that cuts the part short costs the non-SFC
#      rows, which part 5 has in bf16), counts — a process of its own: a failed capture
#      cannot cost part 2                                                                   85
#   5. bf16 autocast, NCHW (cuDNN BatchNorm), foreach SGD: per stage kind a graph row (the
#      SFM eager; a failed row is logged and the next one measured), counts                 65
#   6. release-style reference vs project (SFC stage one), fp32, the project's graph step
#      with its target forwards apart and stacked                                           35
#   7. SFC stage one, fp32 graph, alone and 2 side by side (as its update and reference
#      runs can train at once) as two graphs on two streams of one process (their kernels
#      can overlap); the pipeline from the fastest row per stage kind of parts 2-7           50
#   8. the same, alone and as 2 processes, under a private MPS control daemon where
#      nvidia-cuda-mps-control exists (what MPS=1 SIDE_BY_SIDE=1 exp/pipeline.sh does; without
#      MPS the device time-slices between processes); the pipeline again, with this row      45
# (limits sum to 480 s.) Not measured any more (docs/benchmark.md, 2026-12-04, run 2): checks
# read at once (--check-every 1); bf16 eager (0.87-1.49x fp32); bf16 + channels_last eager (slower than fp32 in 4 of 5 stage
# kinds: native channels-last BatchNorm); --compile default (SFC stage one bf16: 143.9 ms
# against 154.1 fp32 eager, 86-100 s of compilation); the loaders (8 workers: 27-59 samples/s,
# code unchanged since). $OUT (default save_results/gpu_bench) gets 3 files (the device tool
# returns 8): bench_all.json (every part's JSON, by name), run.log (everything printed),
# summary.txt (environment, part status, all tables).
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
  T=(60 120 60 120 120 60 120 120)
  CONVS=(--scale 0.125 --iters 2 --warmup 1)
  PYTEST_MARK="cuda and not slow"
  [[ -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]] && PY="$ROOT/.venv/bin/python"
else
  DEV=(--device cuda --cudnn-benchmark)
  SIZE=()  # CUDA default: the faithful 1280×720 source, 1024×512 target, ResNet-101
  ITERS=(--iters 5 --warmup 2 --eval-images 1)
  REF_ITERS=(--iters 3 --warmup 1)
  T=(65 110 25 85 65 35 50 45)
  CONVS=()
  PYTEST_MARK="cuda"
fi
NOEVAL=(--no-flops --eval-images 0)
DEFER=(--check-every 50)
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
  # the tests never run on a GPU yet first (--cuda-graph's real capture, the s2b convolution),
  # so that a slow cold start cannot cut them off; then the others
  NEW="cuda_graph or s2b or stacked"
  part tests_cuda "${T[0]}" bash -c '"$0" -m pytest -q -x --tb=short -m "$1" -k "$2" tests \
    -p no:cacheprovider; a=$?; "$0" -m pytest -q -x --tb=short -m "$1" -k "not ($2)" tests \
    -p no:cacheprovider; b=$?; exit $(( a > b ? a : b ))' "$PY" "$PYTEST_MARK" "$NEW"
else  # no pytest there: at least the exactness check of the proposed foreach SGD
  part tests_cuda "${T[0]}" "$PY" -m sfc.bench.fastopt "${DEV[1]}"
fi
part bench_fp32 "${T[1]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${ITERS[@]}" \
  --eval-images 4 --eval-batch-size 4 --precision fp32 "${DEFER[@]}" --profile-counts \
  --json "$OUT/bench_fp32.json"
part convs "${T[2]}" "$PY" -m sfc.bench.convs "${DEV[@]:0:2}" "${CONVS[@]}" \
  --cudnn-benchmark --precisions fp32 fp32-strict bf16 --json "$OUT/bench_convs.json"
part bench_fp32_graph "${T[3]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${ITERS[@]}" \
  "${NOEVAL[@]}" --precision fp32 "${DEFER[@]}" --cuda-graph on --profile-counts \
  --stages segnet_sfc accel_sfc segnet accel --stack-forwards both \
  --json "$OUT/bench_fp32_graph.json"
part bench_bf16 "${T[4]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${ITERS[@]}" \
  "${NOEVAL[@]}" --precision bf16 --foreach-sgd "${DEFER[@]}" --cuda-graph on \
  --profile-counts --json "$OUT/bench_bf16.json"
part reference "${T[5]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${REF_ITERS[@]}" \
  --stages --reference --reference-stages segnet_sfc "${DEFER[@]}" --cuda-graph on \
  --stack-forwards both \
  --json "$OUT/bench_reference.json"
EARLIER=("$OUT"/bench_fp32.json "$OUT"/bench_fp32_graph.json "$OUT"/bench_bf16.json)
part side_by_side "${T[6]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${ITERS[@]}" \
  "${NOEVAL[@]}" --precision fp32 "${DEFER[@]}" --cuda-graph on --stages segnet_sfc \
  --side-by-side 2 --side-by-side-mode streams --json "$OUT/bench_side_by_side.json" \
  --pipeline-from "${EARLIER[@]}"
source "$ROOT/exp/mps.sh"
MPS_DIR=""
if [[ "${SFC_BENCH_DRY:-0}" != "1" ]] && command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
  if mps_start; then
    echo "MPS control daemon started (pipes in $CUDA_MPS_PIPE_DIRECTORY)" | tee -a "$LOG"
  else
    echo "MPS control daemon did not start: the processes part runs without MPS" | tee -a "$LOG"
  fi
else
  echo "no MPS here (or a dry run): the processes part runs without it" | tee -a "$LOG"
fi
part processes "${T[7]}" "$PY" -m sfc.bench "${DEV[@]}" "${SIZE[@]}" "${ITERS[@]}" \
  "${NOEVAL[@]}" --precision fp32 "${DEFER[@]}" --cuda-graph on --stages segnet_sfc \
  --side-by-side 2 --side-by-side-mode processes --json "$OUT/bench_processes.json" \
  --pipeline-from "${EARLIER[@]}" "$OUT"/bench_side_by_side.json
mps_stop "$LOG"

{
  echo "gpu_bench finished $(date -Is)"
  echo "$ENV"
  printf '%s\n' "${STATUS[@]}"
  for f in "$OUT"/bench_*.md; do
    [[ -f "$f" ]] && { echo; echo "## $(basename "$f" .md)"; cat "$f"; rm -f "$f"; }
  done
} | tee "$OUT/summary.txt"
# one JSON of every part (the device tool returns at most 8 files)
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = sorted(out.glob("bench_*.json"))
all_ = {p.stem: json.loads(p.read_text()) for p in parts if p.name != "bench_all.json"}
(out / "bench_all.json").write_text(json.dumps(all_, indent=1))
for p in parts:
    if p.name != "bench_all.json":
        p.unlink()
PYEOF
