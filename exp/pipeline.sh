#!/usr/bin/env bash
# The seven runs of the SFC pipeline (method §5) in their order, one command:
#   FlowNet_pretrain stage one (update, reference) -> FlowNet_pretrain stage two -> SFM
#   -> SFC stage one (update, reference) -> SFC stage two.
# Extra arguments go to every run (e.g. --num-workers 8); the environment is that of the stage
# scripts (exp/common.sh: SFC_DATA, SFC_WEIGHTS, SFC_OUT, SOURCE, PYTHON, LAUNCH, DRY_RUN), and
#   SIDE_BY_SIDE=1  the update and reference runs of each stage one train at the same time, each
#                   in its own process on the same device(s) (they are independent); default:
#                   one after the other. Whether that is faster on your GPU: sfc.bench
#                   --side-by-side 2 (docs/benchmark.md); without NVIDIA's MPS daemon the
#                   two processes take turns on the GPU (time slicing).
#   MPS=1           with SIDE_BY_SIDE=1: the runs are clients of NVIDIA's Multi-Process
#                   Service, so the kernels of a pair can run at the same time: a private MPS
#                   control daemon (pipes and logs in a temporary folder) is started for the
#                   pipeline and stopped when it ends, or the one CUDA_MPS_PIPE_DIRECTORY names
#                   is used. Needs nvidia-cuda-mps-control on PATH.
# Run the same command again after a stop: finished runs exit at once ("already finished"),
# an interrupted one resumes. Stop it as a run: a signal to its whole process group (Ctrl-C;
# `kill -TERM -- -PGID`) or SLURM job step reaches the runs in progress, which save last.pt;
# this script waits for them. Exit status: that of the first run that fails (of a pair: the
# update's if both fail); the runs after it do not start.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SIDE_BY_SIDE="${SIDE_BY_SIDE:-0}"
MPS="${MPS:-0}"
# outlive the job signals and wait for the runs (they get the signals themselves)
trap ':' INT TERM USR1

wait_for() {  # wait_for PID : its exit status, also when a trapped signal interrupts the wait
  local rc
  while :; do
    rc=0
    wait "$1" || rc=$?
    kill -0 "$1" 2>/dev/null || return "$rc"
  done
}

stop_if_failed() {  # stop_if_failed SCRIPT STATUS
  if (( $2 != 0 )); then
    echo "== pipeline: $1 exited $2; stopping" >&2
    exit "$2"
  fi
}

one() {  # one SCRIPT ARGS... : a stage script in the foreground
  local script="$1" rc=0
  shift
  echo "== pipeline: $script" >&2
  bash "$HERE/$script" "$@" || rc=$?
  stop_if_failed "$script" "$rc"
}

pair() {  # pair DIR ARGS... : DIR/update.sh and DIR/reference.sh, side by side or in turn
  local dir="$1"
  shift
  if [[ "$SIDE_BY_SIDE" != 1 ]]; then
    one "$dir/update.sh" "$@"
    one "$dir/reference.sh" "$@"
    return
  fi
  echo "== pipeline: $dir/update.sh and $dir/reference.sh side by side" >&2
  local a b ra=0 rb=0
  # two jobs share this node's CPUs: --num-workers auto gives each half
  SFC_JOBS_PER_NODE=2 bash "$HERE/$dir/update.sh" "$@" &
  a=$!
  SFC_JOBS_PER_NODE=2 bash "$HERE/$dir/reference.sh" "$@" &
  b=$!
  wait_for "$a" || ra=$?
  wait_for "$b" || rb=$?
  stop_if_failed "$dir/update.sh" "$ra"
  stop_if_failed "$dir/reference.sh" "$rb"
}

start_mps() {  # MPS=1: a private MPS control daemon for the pipeline (or the given one)
  if [[ "$SIDE_BY_SIDE" != 1 ]]; then
    echo "error: MPS=1 is for the pairs side by side: set SIDE_BY_SIDE=1 too" >&2
    exit 2
  fi
  if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    echo "error: MPS=1 needs nvidia-cuda-mps-control (NVIDIA's Multi-Process Service) on PATH" >&2
    exit 2
  fi
  if [[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]]; then
    echo "== pipeline: MPS: the daemon of CUDA_MPS_PIPE_DIRECTORY=$CUDA_MPS_PIPE_DIRECTORY" >&2
    return
  fi
  source "$HERE/mps.sh"
  if ! mps_start; then
    echo "error: the MPS control daemon did not start (its log: $MPS_LOG_DIR)" >&2
    exit 1
  fi
  trap 'mps_stop' EXIT
  echo "== pipeline: MPS control daemon started (pipes in $CUDA_MPS_PIPE_DIRECTORY)" >&2
}

if [[ "$MPS" == 1 ]]; then
  start_mps
fi
pair FlowNet_pretrain/stage_one/script "$@"
one FlowNet_pretrain/stage_two/script/train.sh "$@"
one SFM/script/train.sh "$@"
pair SFC/stage_one/script "$@"
one SFC/stage_two/script/train.sh "$@"
echo "== pipeline: done" >&2
