"""Accel, the video SegNet of the release (method §3.4)."""

from __future__ import annotations

import torch
from torch import nn

from .deeplab import DeepLabV2, run_float32, upsample_like
from .flownet import FlowNetS
from .warp import warp

# Submodule names = the release's state-dict prefixes.
ACCEL_SUBMODULES = ("net_ref", "net_update", "merge", "flownet")


class Accel(nn.Module):
    """`forward(seg_clip, flow_clip)` with clips `B×3×T×H×W` (frame T-1 current) → logits
    `B×C×H×W` for frame T-1.

    `seg_clip`: SegNet-normalised frames; `flow_clip`: flow-normalised frames (method §2.1).
    The reference branch segments frame 0 and is warped to frame T-1 through T-1 flows.
    """

    def __init__(self, num_classes: int = 15, layers: tuple[int, int, int, int] = (3, 4, 23, 3),
                 width: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.net_ref = DeepLabV2(num_classes, multi_level=False, layers=layers, width=width)
        self.net_update = DeepLabV2(num_classes, multi_level=False, layers=layers, width=width)
        self.merge = nn.Conv2d(2 * num_classes, num_classes, kernel_size=1)
        nn.init.xavier_normal_(self.merge.weight)
        nn.init.zeros_(self.merge.bias)
        self.flownet = FlowNetS()

    @property
    def fp32_heads(self) -> bool:
        """Under autocast, run both classifiers and `merge` in float32 (the SFC stage-two loss
        builds soft masks at scale 100 from these logits; see `DeepLabV2._head`)."""
        return self.net_update.fp32_heads

    @fp32_heads.setter
    def fp32_heads(self, on: bool) -> None:
        self.net_ref.fp32_heads = self.net_update.fp32_heads = bool(on)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What both Accel stages train (method §3.4): merge, flownet, both layer6."""
        mods = (self.merge, self.flownet, self.net_ref.layer6, self.net_update.layer6)
        return [p for m in mods for p in m.parameters()]

    def forward(self, seg_clip: torch.Tensor, flow_clip: torch.Tensor) -> torch.Tensor:
        if seg_clip.dim() != 5 or seg_clip.shape[1] != 3 or seg_clip.shape != flow_clip.shape:
            raise ValueError("Accel expects seg_clip and flow_clip of equal shape B×3×T×H×W, got "
                             f"{tuple(seg_clip.shape)} and {tuple(flow_clip.shape)}")
        t = seg_clip.shape[2]
        size = seg_clip.shape[-2:]
        # The release upsamples ×2 / ×4; for H, W multiples of 8 that equals resizing to the
        # flow grid (⌈H/4⌉, ⌈W/4⌉) / to (H, W), which also defines other sizes.
        grid = ((size[0] + 3) // 4, (size[1] + 3) // 4)
        ref = upsample_like(self.net_ref(seg_clip[:, :, 0]), grid)  # (B, C, H/4, W/4)
        for i in range(t - 1):
            flow = self.flownet(torch.cat((flow_clip[:, :, i + 1], flow_clip[:, :, i]), 1))
            ref = warp(ref, flow)
        upd = upsample_like(self.net_update(seg_clip[:, :, t - 1]), grid)
        both = torch.cat((ref, upd), 1)  # (B, 2C, H/4, W/4)
        if self.fp32_heads and torch.is_autocast_enabled(both.device.type):
            out = run_float32(self.merge, both)
        else:
            out = self.merge(both)  # (B, C, H/4, W/4)
        return upsample_like(out, size)  # (B, C, H, W)
