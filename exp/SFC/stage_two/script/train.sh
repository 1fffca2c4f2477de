#!/usr/bin/env bash
# SFC stage two: Accel from the SFC stage-one SegNets and the Flying Chairs FlowNet; source CE
# + 0.001 x SFC stage-two loss on 3-frame Cityscapes clips (method §5). Its best.pt holds the
# final model (Accel, plus flownet_global and SFM).
# Run dir: $SFC_OUT/$SOURCE/SFC/stage_two/train (BN_CONTROL=1: SFC_bn_control/...).
# Extra arguments override.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../../common.sh"

ARGS=(
  --stage accel
  --seed 0
  --iters 160000
  --eval-every 2000         # Cityscapes-val mIoU of Accel on (f-1, f)
  --lr 5e-4 --warmup-lr 5e-5 --warmup-iters 1000
  --warmup-order before     # LR set before each step: steps 1-1000 at 5e-5, then 5e-4
  --momentum 0.9 --weight-decay 5e-4
  --batch-size 1
  --sfc-weight 0.001
  --scale 100               # hard-coded by the release's stage-two script
)
chairs_init "$@"
need_run --update-ckpt "$(sfc_run_dir SFC/stage_one/update)" SFC/stage_one/script/update.sh "$@"
need_run --reference-ckpt "$(sfc_run_dir SFC/stage_one/reference)" \
  SFC/stage_one/script/reference.sh "$@"
need_run --flownet-ckpt "$(run_dir FlowNet_pretrain/stage_two/train)" \
  FlowNet_pretrain/stage_two/script/train.sh "$@"
need_run --sfm-ckpt "$(run_dir SFM/train)" SFM/script/train.sh "$@"
bn_control_args
run_train "$(sfc_run_dir SFC/stage_two/train)" "$@"
