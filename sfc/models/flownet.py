"""Thin FlowNetS (3/8 of FlowNetS's width), the release's FlowNet and SFM (method §3.2).

Keys: `convX.0.weight/bias`, `deconvX.0.weight/bias`, `predict_flowX.weight/bias`,
`upsample_flowXtoY.weight/bias` — those of the Flying Chairs file the release ships (5.46 M
parameters). Conv/deconv weights keep PyTorch's default init; the release always loads them.
"""

from __future__ import annotations

import torch
from torch import nn

FLOW_SCALE = 5.0  # the release multiplies flow2 by 5 → pixels of the 1/4-resolution grid
DIV_FLOW = 20.0  # FlowNet training predicts flow / 20 (full-res px); 20 / 4 = FLOW_SCALE


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=True),
                         nn.LeakyReLU(0.1, inplace=True))


def _deconv(cin: int, cout: int) -> nn.Sequential:
    # k4 s2 p0: output 2h+2, cropped to the skip's size by `_crop_like`.
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 0, bias=True),
                         nn.LeakyReLU(0.1, inplace=True))


def _crop_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Drop the first row/column and the trailing excess ("antipad": 1 for even, 2 for odd)."""
    h, w = ref.shape[-2:]
    return x[:, :, 1:1 + h, 1:1 + w]


class FlowNetS(nn.Module):
    """`forward(cat([frame_t, frame_{t-1}], 1): B×6×H×W)` → backward flow `B×2×⌈H/4⌉×⌈W/4⌉`.

    Frames flow-normalised (BGR / 255, method §2.1). Output in pixels of the 1/4 grid:
    `warp(x_{t-1}, flow)(p) = x_{t-1}(p + flow(p))` aligns frame t-1 to frame t.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = _conv(6, 24, 7, 2)
        self.conv2 = _conv(24, 48, 5, 2)
        self.conv3 = _conv(48, 96, 5, 2)
        self.conv3_1 = _conv(96, 96)
        self.conv4 = _conv(96, 192, stride=2)
        self.conv4_1 = _conv(192, 192)
        self.conv5 = _conv(192, 192, stride=2)
        self.conv5_1 = _conv(192, 192)
        self.conv6 = _conv(192, 384, stride=2)
        self.conv6_1 = _conv(384, 384)

        self.deconv5 = _deconv(384, 192)
        self.deconv4 = _deconv(386, 96)
        self.deconv3 = _deconv(290, 48)
        self.deconv2 = _deconv(146, 24)

        self.predict_flow6 = nn.Conv2d(384, 2, 3, 1, 1, bias=True)
        self.predict_flow5 = nn.Conv2d(386, 2, 3, 1, 1, bias=True)
        self.predict_flow4 = nn.Conv2d(290, 2, 3, 1, 1, bias=True)
        self.predict_flow3 = nn.Conv2d(146, 2, 3, 1, 1, bias=True)
        self.predict_flow2 = nn.Conv2d(74, 2, 3, 1, 1, bias=True)

        self.upsample_flow6to5 = nn.ConvTranspose2d(2, 2, 4, 2, 0, bias=True)
        self.upsample_flow5to4 = nn.ConvTranspose2d(2, 2, 4, 2, 0, bias=True)
        self.upsample_flow4to3 = nn.ConvTranspose2d(2, 2, 4, 2, 0, bias=True)
        self.upsample_flow3to2 = nn.ConvTranspose2d(2, 2, 4, 2, 0, bias=True)

    def reset_parameters_flownet(self) -> FlowNetS:
        """The FlowNet training init (the common PyTorch FlowNet code): every conv and
        transposed conv weight Kaiming-normal with the LeakyReLU slope 0.1, biases 0. Used when
        a FlowNetS is trained from scratch on Flying Chairs (`--stage flownet`)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, a=0.1)
                nn.init.zeros_(m.bias)
        return self

    def forward(self, x: torch.Tensor, pyramid: bool = False):
        """Backward flow `(B, 2, ⌈H/4⌉, ⌈W/4⌉)` in pixels of the 1/4 grid: `flow2 × 5`;
        `pyramid=True`: the raw five-scale outputs of `pyramid` instead (Flying-Chairs
        training, through DistributedDataParallel's forward)."""
        if pyramid:
            return self.pyramid(x)
        return self.pyramid(x)[0] * FLOW_SCALE

    def pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The raw predictions `(flow2, flow3, flow4, flow5, flow6)` at 1/4 … 1/64 resolution,
        each in full-resolution pixels divided by 20 (`DIV_FLOW`, the FlowNet training
        convention that `flow2 × 5` turns into pixels of the 1/4 grid); the multi-scale
        Flying-Chairs loss (`sfc.losses.multiscale_epe`) supervises all five."""
        if x.dim() != 4 or x.shape[1] != 6:
            raise ValueError(f"FlowNetS expects B×6×H×W (cat of frame t and t-1), "
                             f"got {tuple(x.shape)}")
        out_conv2 = self.conv2(self.conv1(x))  # (B, 48, ⌈H/4⌉, ⌈W/4⌉)
        out_conv3 = self.conv3_1(self.conv3(out_conv2))  # 1/8
        out_conv4 = self.conv4_1(self.conv4(out_conv3))  # 1/16
        out_conv5 = self.conv5_1(self.conv5(out_conv4))  # 1/32
        out_conv6 = self.conv6_1(self.conv6(out_conv5))  # 1/64

        flow6 = self.predict_flow6(out_conv6)
        concat5 = torch.cat((out_conv5,
                             _crop_like(self.deconv5(out_conv6), out_conv5),
                             _crop_like(self.upsample_flow6to5(flow6), out_conv5)), 1)
        flow5 = self.predict_flow5(concat5)
        concat4 = torch.cat((out_conv4,
                             _crop_like(self.deconv4(concat5), out_conv4),
                             _crop_like(self.upsample_flow5to4(flow5), out_conv4)), 1)
        flow4 = self.predict_flow4(concat4)
        concat3 = torch.cat((out_conv3,
                             _crop_like(self.deconv3(concat4), out_conv3),
                             _crop_like(self.upsample_flow4to3(flow4), out_conv3)), 1)
        flow3 = self.predict_flow3(concat3)
        concat2 = torch.cat((out_conv2,
                             _crop_like(self.deconv2(concat3), out_conv2),
                             _crop_like(self.upsample_flow3to2(flow3), out_conv2)), 1)
        flow2 = self.predict_flow2(concat2)  # (B, 2, ⌈H/4⌉, ⌈W/4⌉), full-res px / 20
        return flow2, flow3, flow4, flow5, flow6
