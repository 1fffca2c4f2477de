"""Streaming Accel: Accel's inference as it was trained — the heavy reference branch on
keyframes, its prediction propagated by optical flow, fused with the light update branch of the
current frame.

With the keyframe *interval* N (a period), frame t is d = t mod N frames after its keyframe (its
keyframe *distance*):
* on a keyframe (d = 0) the output is the **reference branch alone** (its 1/8 logits upsampled
  bilinearly to the frame size): no stage ever trained the fusion at distance 0;
* at d >= 1 the output equals `Accel.forward` on the clip (keyframe, ..., frame) of d + 1
  frames — what `sfc.evaluate --keyframe-distance d` scores (tested): the keyframe's reference
  logits at 1/4 resolution are warped once per frame with `flownet(cat[frame_t, frame_{t-1}])`
  and merged with the update branch of the frame.
Per keyframe: one reference pass; per other frame: one update pass and one FlowNet pass.
"""

from __future__ import annotations

import torch

from sfc.models.accel import Accel
from sfc.models.deeplab import upsample_like
from sfc.models.warp import warp


class StreamingAccel:
    """`step(seg, flow)` with one frame `B×3×H×W` (SegNet- and flow-normalised) → logits
    `B×C×H×W` of that frame. `keyframe_interval` N: the reference branch runs on frames
    0, N, 2N, ... of the stream; `distance` is the keyframe distance of the frame `step` was
    last called with; `reset()` starts a new stream."""

    def __init__(self, accel: Accel, keyframe_interval: int = 1):
        if keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {keyframe_interval}")
        self.accel = accel.eval()
        self.k = int(keyframe_interval)
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self.distance = None
        self.ref = None  # (B, C, ⌈H/4⌉, ⌈W/4⌉) reference logits carried to the last frame
        self.prev_flow_img = None

    def is_keyframe(self, t: int | None = None) -> bool:
        return (self.t if t is None else t) % self.k == 0

    @torch.no_grad()
    def step(self, seg: torch.Tensor, flow_img: torch.Tensor) -> torch.Tensor:
        a = self.accel
        size = seg.shape[-2:]
        grid = ((size[0] + 3) // 4, (size[1] + 3) // 4)  # the flow grid, as Accel.forward
        self.distance = self.t % self.k
        self.prev_flow_img, prev = flow_img, self.prev_flow_img
        self.t += 1
        if self.distance == 0:  # a keyframe: the reference branch alone
            ref = a.net_ref(seg)  # (B, C, H/8, W/8)
            self.ref = upsample_like(ref, grid)  # carried on at 1/4, as Accel.forward
            return upsample_like(ref, size)  # (B, C, H, W)
        flow = a.flownet(torch.cat((flow_img, prev), 1))  # t -> t-1
        self.ref = warp(self.ref, flow)
        upd = upsample_like(a.net_update(seg), grid)
        out = a.merge(torch.cat((self.ref, upd), 1))
        return upsample_like(out, size)  # (B, C, H, W)
