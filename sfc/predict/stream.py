"""Streaming Accel (issue 12): what Accel is for — the heavy reference branch on keyframes, its
prediction propagated by optical flow, the light update branch on every frame.

For a frame d frames after its keyframe (d = t mod K), the output equals `Accel.forward` on the
clip (keyframe, ..., frame) of d + 1 frames (tested): the reference logits of the keyframe at
1/4 resolution are warped once per frame with the flow `flownet(cat[frame_t, frame_{t-1}])`,
then merged with the update branch of the frame. Per frame: one update pass and one FlowNet
pass (none on a keyframe); per keyframe: one reference pass.
"""

from __future__ import annotations

import torch

from sfc.models import Accel, warp
from sfc.models.deeplab import upsample_like


class StreamingAccel:
    """`step(seg, flow)` with one frame `B×3×H×W` (SegNet- and flow-normalised) → logits
    `B×C×H×W` of that frame. `keyframe_interval` K: the reference branch runs on frames
    0, K, 2K, ... of the stream; `reset()` starts a new stream."""

    def __init__(self, accel: Accel, keyframe_interval: int = 1):
        if keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {keyframe_interval}")
        self.accel = accel.eval()
        self.k = int(keyframe_interval)
        self.reset()

    def reset(self) -> None:
        self.t = 0
        self.ref = None  # (B, C, ⌈H/4⌉, ⌈W/4⌉) reference logits carried to the last frame
        self.prev_flow_img = None

    def is_keyframe(self, t: int | None = None) -> bool:
        return (self.t if t is None else t) % self.k == 0

    @torch.no_grad()
    def step(self, seg: torch.Tensor, flow_img: torch.Tensor) -> torch.Tensor:
        a = self.accel
        size = seg.shape[-2:]
        grid = ((size[0] + 3) // 4, (size[1] + 3) // 4)  # the flow grid, as Accel.forward
        if self.is_keyframe():
            self.ref = upsample_like(a.net_ref(seg), grid)
        else:
            flow = a.flownet(torch.cat((flow_img, self.prev_flow_img), 1))  # t -> t-1
            self.ref = warp(self.ref, flow)
        upd = upsample_like(a.net_update(seg), grid)
        out = a.merge(torch.cat((self.ref, upd), 1))
        self.prev_flow_img = flow_img
        self.t += 1
        return upsample_like(out, size)  # (B, C, H, W)
