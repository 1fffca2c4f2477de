#!/usr/bin/env bash
# FlowNet_pretrain stage one, 'update' SegNet: source-only DeepLab-v2 on the source (method §5).
# Run dir: $SFC_OUT/$SOURCE/FlowNet_pretrain/stage_one/update.  Extra arguments override (e.g. --iters 200 --eval-every 100).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../../common.sh"

ARGS=(
  --stage segnet            # single-frame DeepLab-v2 ResNet-101, multi-level (CE + 0.1 CE_aux)
  --seed 0                  # update runs seed 0, reference runs seed 1 (quirk 4)
  --iters 80000
  --eval-every 2000         # Cityscapes-val mIoU of the main head on frame f
  --lr 2.5e-4               # poly: 2.5e-4 (1 - i/80000)^0.9; classifiers 10x
  --momentum 0.9 --weight-decay 5e-4
  --optimizer release       # the release's duplicated backbone parameters (method §3.1)
  --batch-size 1            # one source clip (+ one target clip) per step
  --sfc-weight 0
)
imagenet_init "$@"
run_train "$(run_dir FlowNet_pretrain/stage_one/update)" "$@"
