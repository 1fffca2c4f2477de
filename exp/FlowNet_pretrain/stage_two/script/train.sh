#!/usr/bin/env bash
# FlowNet_pretrain stage two: source-only Accel built from the two stage-one SegNets; trains
# merge, flownet and both layer6 (one group), which trains the FlowNet on the source (method §5).
# Run dir: $SFC_OUT/$SOURCE/FlowNet_pretrain/stage_two/train.  Extra arguments override.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../../common.sh"

ARGS=(
  --stage accel             # Accel: net_ref (frame t-1), net_update (frame t), merge, flownet
  --seed 0
  --iters 80000
  --eval-every 2000         # Cityscapes-val mIoU of Accel on (f-1, f)
  --lr 5e-4 --warmup-lr 5e-5 --warmup-iters 1000
  --warmup-order after      # LR set after each step: 1st step 5e-4, steps 2-1001 5e-5 (quirk 3)
  --momentum 0.9 --weight-decay 5e-4
  --batch-size 1
  --sfc-weight 0
)
chairs_init "$@"
need_run --update-ckpt "$(run_dir FlowNet_pretrain/stage_one/update)" \
  FlowNet_pretrain/stage_one/script/update.sh "$@"
need_run --reference-ckpt "$(run_dir FlowNet_pretrain/stage_one/reference)" \
  FlowNet_pretrain/stage_one/script/reference.sh "$@"
run_train "$(run_dir FlowNet_pretrain/stage_two/train)" "$@"
