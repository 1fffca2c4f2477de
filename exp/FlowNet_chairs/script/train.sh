#!/usr/bin/env bash
# Flying Chairs: a FlowNetS supervised on ground-truth flow — the init (--chairs-init) of both
# Accel stages. Optional for users who have the release's flownet_flyingchairs_pretrained.pth;
# it reproduces that init from the real Flying Chairs (or, for the demo, from the synthetic set
# of `python -m sfc.data.synthetic --flying-chairs $SFC_DATA/FlyingChairs`). The recipe is the
# common PyTorch FlowNet code's (docs/flow.md), on SFC's FlowNet input normalisation (BGR / 255).
# Data: $SFC_DATA/FlyingChairs/{FlyingChairs_release/data/, FlyingChairs_train_val.txt}.
# Run dir: $SFC_OUT/$SOURCE/FlowNet_chairs/train; when it finishes it also holds
# flownet_flyingchairs_pretrained.pth (the best FlowNetS, the release's key layout), which the
# Accel scripts take when $SFC_WEIGHTS has no such file.  Extra arguments override.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../common.sh"

ARGS=(
  --stage flownet
  --seed 0
  --iters 300000            # 300 epochs of 1000 iterations
  --eval-every 5000         # Flying Chairs val EPE (with the zero-flow baseline); lower is better
  --lr 1e-4                 # Adam (0.9, 0.999), halved at 100k, 150k and 200k iterations
  --weight-decay 4e-4       # L2 on the weights, none on the biases
  --batch-size 8            # image pairs per step
)
chairs="$SFC_DATA/FlyingChairs/FlyingChairs_release/data"
[[ -d "$chairs" ]] || fail_or_note "missing $chairs: download Flying Chairs (see README) and \
put FlyingChairs_release/ and FlyingChairs_train_val.txt in $SFC_DATA/FlyingChairs, or write a \
synthetic one: python -m sfc.data.synthetic --flying-chairs $SFC_DATA/FlyingChairs"
run_train "$(run_dir FlowNet_chairs/train)" "$@"
