#!/usr/bin/env bash
# SFM pre-training on the source: SFM and flownet_global both start from the FlowNet of
# FlowNet_pretrain stage two; EPE between the segmentation-based flow of ground-truth masks and
# flownet_global's flow (method §4, §5). SYNTHIA-Seq: the last 50 annotated frames are held out
# as the source val split (--synthia-val-frames).
# Run dir: $SFC_OUT/$SOURCE/SFM/train.  Extra arguments override.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

ARGS=(
  --stage sfm
  --seed 0
  --iters 80000
  --eval-every 4000         # source-val EPE (unmasked, mean of per-image means); lower is better
  --lr 1e-4                 # Adam, betas (0.9, 0.999), eps 1e-8, constant
  --weight-decay 4e-4       # L2 added to the gradient (torch Adam), not AdamW
  --batch-size 1
)
need_run --flownet-ckpt "$(run_dir FlowNet_pretrain/stage_two/train)" \
  FlowNet_pretrain/stage_two/script/train.sh "$@"
run_train "$(run_dir SFM/train)" "$@"
