# A private NVIDIA MPS (Multi-Process Service) control daemon (sourced, not run): the
# processes started after `mps_start` are its clients, so kernels of processes side by side
# can run at the same time. Used by exp/pipeline.sh (MPS=1) and scripts/gpu_bench.sh.

# mps_start: make a temporary folder (MPS_DIR) for the daemon's pipes and logs, export
# CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY there and start the daemon. Non-zero if it
# did not start: the variables are unset again (the folder and its log stay, for the message).
mps_start() {
  MPS_DIR="$(mktemp -d -t sfc-mps.XXXXXX)"
  export CUDA_MPS_PIPE_DIRECTORY="$MPS_DIR/pipe" CUDA_MPS_LOG_DIRECTORY="$MPS_DIR/log"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && return 0
  MPS_LOG_DIR="$CUDA_MPS_LOG_DIRECTORY"
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  return 1
}

# mps_stop [LOGFILE]: quit the daemon `mps_start` started (its logs appended to LOGFILE if
# given), unset the variables and remove the folder. Nothing to do if none was made.
mps_stop() {
  [[ -n "${MPS_DIR:-}" ]] || return 0
  if [[ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ]]; then
    echo quit | timeout 20 nvidia-cuda-mps-control >/dev/null 2>&1 \
      || { [[ -n "${1:-}" ]] && echo "MPS daemon: quit failed" >> "$1"; }
    [[ -n "${1:-}" ]] && { echo "--- MPS logs"; cat "$CUDA_MPS_LOG_DIRECTORY"/*.log; } \
      >> "$1" 2>/dev/null
  fi
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  rm -rf "$MPS_DIR"
  MPS_DIR=""
  return 0
}
