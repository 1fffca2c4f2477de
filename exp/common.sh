# Shared logic of the stage scripts (the seven runs, and the optional Flying Chairs one) (sourced, not run). Each script sets ARGS (the
# paper's hyper-parameters for `python -m sfc.train`), names the earlier runs it needs, then
# calls `run_train OUT_DIR "$@"`.
#
# Environment (all optional):
#   SFC_DATA     data root with VIPER/, Cityscapes/, SynthiaSeq/   (default <repo>/data)
#   SFC_WEIGHTS  pretrained weights                                (default <repo>/model_weights)
#   SFC_OUT      run directories, mirroring exp/                   (default <repo>/save_results)
#   SOURCE       viper (default) or synthia_seq
#   PYTHON       interpreter (default <repo>/.venv/bin/python if present, else python3); one
#                path, spaces allowed
#   LAUNCH       launcher prefix, split into words, e.g. "torchrun --nproc_per_node=4"
#                (default: "$PYTHON")
#   DRY_RUN=1    print the command instead of running it
# Exit status: that of sfc.train (also through LAUNCH: rank 0's status record), see
# docs/pipeline.md.
#   BN_CONTROL=1 SFC stages: the control run (--bn-control: the SFC stage's target forwards,
#                no SFC loss), written to the sibling tree SFC_bn_control/ (stage two consumes
#                the control's stage-one runs)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SFC_DATA="${SFC_DATA:-$REPO/data}"
SFC_WEIGHTS="${SFC_WEIGHTS:-$REPO/model_weights}"
SFC_OUT="${SFC_OUT:-$REPO/save_results}"
SOURCE="${SOURCE:-viper}"
DRY_RUN="${DRY_RUN:-0}"
BN_CONTROL="${BN_CONTROL:-0}"
case "$SOURCE" in
  viper | synthia_seq) ;;
  *) echo "error: SOURCE must be viper or synthia_seq, got '$SOURCE'" >&2; exit 2 ;;
esac
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
LAUNCH="${LAUNCH:-}"

# run_dir RELPATH -> $SFC_OUT/$SOURCE/RELPATH (RELPATH mirrors exp/ without script/)
run_dir() { echo "$SFC_OUT/$SOURCE/$1"; }

# sfc_run_dir RELPATH -> run_dir of an SFC stage: SFC/... or, with BN_CONTROL=1, the control's
# sibling SFC_bn_control/...
sfc_run_dir() {
  if [[ "$BN_CONTROL" == 1 ]]; then run_dir "SFC_bn_control/${1#SFC/}"; else run_dir "$1"; fi
}

# bn_control_args: adds --bn-control with BN_CONTROL=1
bn_control_args() {
  if [[ "$BN_CONTROL" == 1 ]]; then ARGS+=(--bn-control); fi
}

# has_flag FLAG ARGS... -> true if FLAG is among ARGS (the script's "$@" overrides)
has_flag() {
  local f="$1"; shift
  local a
  for a in "$@"; do [[ "$a" == "$f" || "$a" == "$f="* ]] && return 0; done
  return 1
}

fail_or_note() {  # in a dry run, a missing input is only reported
  if [[ "$DRY_RUN" == 1 ]]; then echo "note (dry run): $1" >&2; else echo "error: $1" >&2; exit 1; fi
}

# need_run FLAG DIR PRODUCER ARGS... : adds "FLAG DIR" to ARGS; DIR must hold best.pt or
# last.pt, else the error names the script that produces it. Skipped when "$@" passes FLAG.
need_run() {
  local flag="$1" dir="$2" producer="$3"; shift 3
  has_flag "$flag" "$@" && return 0
  if [[ ! -f "$dir/best.pt" && ! -f "$dir/last.pt" ]]; then
    fail_or_note "missing $dir/best.pt — run exp/$producer first (SOURCE=$SOURCE)"
  fi
  ARGS+=("$flag" "$dir")
}

# imagenet_init ARGS... : the DeepLab-v2 ImageNet init, unless "$@" passes --imagenet-init
imagenet_init() {
  has_flag --imagenet-init "$@" && return 0
  local f
  for f in DeepLab_resnet_pretrained_init-f81d91e8.pth DeepLab_resnet_pretrained_imagenet.pth; do
    if [[ -f "$SFC_WEIGHTS/$f" ]]; then ARGS+=(--imagenet-init "$SFC_WEIGHTS/$f"); return 0; fi
  done
  fail_or_note "no ImageNet init in $SFC_WEIGHTS: put DeepLab_resnet_pretrained_init-f81d91e8.pth \
(DeepLab-v2 init) or ADVENT's release asset DeepLab_resnet_pretrained_imagenet.pth there (see \
README), or pass --imagenet-init none for a random init"
  ARGS+=(--imagenet-init "$SFC_WEIGHTS/DeepLab_resnet_pretrained_init-f81d91e8.pth")
}

# chairs_init ARGS... : the Flying Chairs FlowNetS, unless "$@" passes --chairs-init: the
# release's file in $SFC_WEIGHTS, else a finished run of exp/FlowNet_chairs/script/train.sh
chairs_init() {
  has_flag --chairs-init "$@" && return 0
  local f="$SFC_WEIGHTS/flownet_flyingchairs_pretrained.pth"
  local run
  run="$(run_dir FlowNet_chairs/train)"
  if [[ ! -f "$f" && -f "$run/result.json" ]]; then
    ARGS+=(--chairs-init "$run"); return 0
  fi
  [[ -f "$f" ]] || fail_or_note "missing $f: take flownet_flyingchairs_pretrained.pth from the \
authors' GitHub repository (EdenHazardan/SFC, model_weights/; see README), or train one with \
exp/FlowNet_chairs/script/train.sh, or pass --chairs-init none for a random init"
  ARGS+=(--chairs-init "$f")
}

# run_train OUT_DIR ARGS... : python -m sfc.train with ARGS, then the script's "$@" (later
# flags override earlier ones)
run_train() {
  local out="$1"; shift
  local -a cmd
  if [[ -n "$LAUNCH" ]]; then
    read -r -a cmd <<< "$LAUNCH"  # a launcher prefix: words
  else
    cmd=("$PYTHON")  # one path, which may hold spaces
  fi
  cmd+=(-m sfc.train "${ARGS[@]}" --source "$SOURCE" --data "$SFC_DATA" --out "$out" "$@")
  echo "+ $(printf '%q ' "${cmd[@]}")"
  [[ "$DRY_RUN" == 1 ]] && return 0
  mkdir -p "$out"
  # sfc.train (rank 0) writes why it stopped to $SFC_STATUS_FILE: a launcher such as torchrun
  # exits 1 whatever its workers did, so the script passes on the documented exit status
  # (0 done, 2 bad input / data error, 3 diverged, 4 disk full, 5 a process died,
  # 128 + signal when stopped by a signal with last.pt saved)
  local status_file rc=0 st
  status_file="$(mktemp "${TMPDIR:-/tmp}/sfc-status.XXXXXX")"
  # The job signals go to the whole process group or job step (Ctrl-C, SLURM): this shell
  # must outlive them and wait for sfc.train, which saves last.pt first (a shell killed by
  # them would end a SLURM step while the save is still running). A no-op trap, not a
  # forward: sfc.train gets the signal itself (a late second one would stop it at once).
  trap ':' INT TERM USR1
  SFC_STATUS_FILE="$status_file" PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${cmd[@]}" \
    || rc=$?
  trap - INT TERM USR1
  st="$(sed -n 's/^ *"exit_status": *\([0-9][0-9]*\).*/\1/p' "$status_file" | head -n 1)"
  rm -f "$status_file"
  [[ -n "$st" ]] && rc="$st"
  return "$rc"
}
