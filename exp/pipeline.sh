#!/usr/bin/env bash
# The seven runs of the SFC pipeline (method §5) in their order, one command:
#   FlowNet_pretrain stage one (update, reference) -> FlowNet_pretrain stage two -> SFM
#   -> SFC stage one (update, reference) -> SFC stage two.
# Extra arguments go to every run (e.g. --num-workers 8); the environment is that of the stage
# scripts (exp/common.sh: SFC_DATA, SFC_WEIGHTS, SFC_OUT, SOURCE, PYTHON, LAUNCH, DRY_RUN), and
#   SIDE_BY_SIDE=1  the update and reference runs of each stage one train at the same time, each
#                   in its own process on the same device(s) (they are independent); default:
#                   one after the other. Whether that is faster on your GPU: sfc.bench
#                   --side-by-side 2 (docs/benchmark.md).
# Run the same command again after a stop: finished runs exit at once ("already finished"),
# an interrupted one resumes. A stop of the pipeline (Ctrl-C, SIGTERM, SIGUSR1) is passed to
# the runs in progress, which save last.pt and exit. Exit status: that of the first run that
# fails (of a pair: the update's if both fail); the runs after it do not start.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SIDE_BY_SIDE="${SIDE_BY_SIDE:-0}"
RUNNING=()

# Each run is a job of its own process group (job control on), so that a stop reaches the
# whole run — its stage script and sfc.train below it — through the trap, once.
set -m
stop() {  # pass the signal on to every run in progress
  local pid
  for pid in "${RUNNING[@]}"; do kill "-$1" -- "-$pid" 2>/dev/null || true; done
}
trap 'stop INT' INT
trap 'stop TERM' TERM
trap 'stop USR1' USR1

wait_for() {  # wait_for PID : its exit status, also when a trapped signal interrupts the wait
  local rc
  while :; do
    rc=0
    wait "$1" || rc=$?
    kill -0 "$1" 2>/dev/null || return "$rc"
  done
}

run() {  # run SCRIPT... -- ARGS : the stage scripts at once; stop with the first failure
  local -a scripts=() pids=() codes=()
  while [[ "$1" != "--" ]]; do scripts+=("$1"); shift; done
  shift
  echo "== pipeline: ${scripts[*]}" >&2
  local s i rc
  for s in "${scripts[@]}"; do
    bash "$HERE/$s" "$@" &
    pids+=("$!")
  done
  RUNNING=("${pids[@]}")
  for i in "${!pids[@]}"; do
    rc=0
    wait_for "${pids[$i]}" || rc=$?
    codes+=("$rc")
  done
  RUNNING=()
  for i in "${!codes[@]}"; do
    if (( codes[i] != 0 )); then
      echo "== pipeline: ${scripts[$i]} exited ${codes[$i]}; stopping" >&2
      exit "${codes[$i]}"
    fi
  done
}

pair() {  # pair DIR ARGS... : DIR/update.sh and DIR/reference.sh, side by side or in turn
  local dir="$1"; shift
  if [[ "$SIDE_BY_SIDE" == 1 ]]; then
    run "$dir/update.sh" "$dir/reference.sh" -- "$@"
  else
    run "$dir/update.sh" -- "$@"
    run "$dir/reference.sh" -- "$@"
  fi
}

pair FlowNet_pretrain/stage_one/script "$@"
run FlowNet_pretrain/stage_two/script/train.sh -- "$@"
run SFM/script/train.sh -- "$@"
pair SFC/stage_one/script "$@"
run SFC/stage_two/script/train.sh -- "$@"
echo "== pipeline: done" >&2
