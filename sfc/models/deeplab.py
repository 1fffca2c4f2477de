"""DeepLab-v2 on a Caffe-style ResNet (method §3.1), state-dict keys as in the SFC release.

Default `DeepLabV2()` is the paper's ResNet-101 (`layers=(3, 4, 23, 3)`, `width=64`); smaller
`layers`/`width` give a fast test/demo variant with the same structure and key names.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .aspp_gemm import AsppSum, use_gemm
from .dilated import dilated_conv
from .stacked import StackableBatchNorm2d

# Dilations (= paddings) of the four parallel 3x3 convs of DeepLab-v2's "ASPP" classifier.
ASPP_DILATIONS = (6, 12, 18, 24)

# Backbone modules walked by the release's 1x-LR parameter helper (AdaptSegNet/ADVENT
# `get_1x_lr_params_NOscale`), in its order.
BACKBONE_MODULES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
CLASSIFIER_MODULES = ("layer5", "layer6")


class Bottleneck(nn.Module):
    """ResNet bottleneck, Caffe style: the stride sits on the first 1x1 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = StackableBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = StackableBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = StackableBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(dilated_conv(self.conv2, out)))  # --dilated-impl
        out = self.bn3(self.conv3(out))
        out += residual  # in place, as the release (BN's backward does not need its output)
        return self.relu(out)


class ClassifierModule(nn.Module):
    """DeepLab-v2 classifier: 3x3 convs (dilation = padding = 6, 12, 18, 24), outputs summed."""

    def __init__(self, inplanes: int, num_classes: int, dilations=ASPP_DILATIONS):
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, kernel_size=3, stride=1, padding=d, dilation=d,
                      bias=True)
            for d in dilations
        )
        for m in self.conv2d_list:
            m.weight.data.normal_(0, 0.01)  # biases keep PyTorch's default uniform init
        self.dilations = tuple(dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [t for m in self.conv2d_list for t in (m.weight, m.bias)]
        if use_gemm(x, params):  # training on the CPU: the same sum as GEMMs (aspp_gemm.py)
            return AsppSum.apply(x, self.dilations, *params)
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLab-v2 ResNet. `forward(x: B×3×H×W)` → logits `B×C×⌈H/8⌉×⌈W/8⌉` (1/8 resolution),
    or `(main, aux)` when `multi_level` (aux from `layer5` on layer3's output).

    Input: BGR, 0–255, mean-subtracted (method §2.1). `width` is the stem/layer1 width; layer k has
    `width·2^(k-1)` planes (×4 out), so layer3 outputs `16·width` and layer4 `32·width` channels.
    """

    def __init__(self, num_classes: int = 15, multi_level: bool = False,
                 layers: tuple[int, int, int, int] = (3, 4, 23, 3), width: int = 64):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four block counts >= 1, got {layers}")
        self.num_classes = num_classes
        self.multi_level = multi_level
        self.fp32_heads = False  # set by the SFC stages under bf16 autocast (see _head)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = StackableBatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # The SFC release uses ceil_mode=False here (ADVENT's copy uses True).
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=False)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], dilation=2)
        self.layer4 = self._make_layer(width * 8, layers[3], dilation=4)
        if multi_level:
            self.layer5 = ClassifierModule(width * 16, num_classes)
        self.layer6 = ClassifierModule(width * 32, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
        # Only the stem BN is frozen in the release (the blocks' BNs train; method §3.1: 310
        # trainable backbone tensors).
        for p in self.bn1.parameters():
            p.requires_grad = False

    def _make_layer(self, planes: int, blocks: int, stride: int = 1,
                    dilation: int = 1) -> nn.Sequential:
        # Every layer's first block has a downsample (the release's condition is always true).
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
            StackableBatchNorm2d(planes * 4),
        )
        mods = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        mods += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone: `(layer3 output (B, 16w, 1/8), layer4 output (B, 32w, 1/8))`.

        Every BatchNorm of the network is in here (the classifiers have none), so in train mode
        `features(x)` moves the BN running statistics exactly as `forward(x)` does."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DeepLabV2 expects B×3×H×W input, got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, w, ⌈H/4⌉, ⌈W/4⌉)
        x = self.layer2(self.layer1(x))  # (B, 8w, ⌈H/8⌉, ⌈W/8⌉)
        x3 = self.layer3(x)  # (B, 16w, 1/8)
        return x3, self.layer4(x3)

    def forward(self, x: torch.Tensor):
        x3, x4 = self.features(x)
        main = self._head(self.layer6, x4)  # (B, C, 1/8)
        if self.multi_level:
            return main, self._head(self.layer5, x3)
        return main

    def _head(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A classifier; with `fp32_heads` under autocast it runs in float32 on the (rounded)
        features, so the logits are not rounded to bf16 (what the SFC soft masks at scale 100
        need: a rounding of 0.03 is 3 units inside their softmax)."""
        if self.fp32_heads and torch.is_autocast_enabled(x.device.type):
            return run_float32(head, x)
        return head(x)

    # ---- parameter groups (method §3.1) -------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters, each once (the 1x-LR group)."""
        return [p for name in BACKBONE_MODULES for p in getattr(self, name).parameters()
                if p.requires_grad]

    def classifier_parameters(self) -> list[nn.Parameter]:
        """Trainable classifier parameters (`layer5` if present, `layer6`; the 10x-LR group)."""
        return [p for name in CLASSIFIER_MODULES if hasattr(self, name)
                for p in getattr(self, name).parameters() if p.requires_grad]

    def release_param_repeats(self) -> list[tuple[str, nn.Parameter, int]]:
        """For each trainable backbone parameter, how often the release's 1x-LR helper yields it.

        Re-derives the release's walk: for each module b in (conv1, bn1, layer1..layer4), for
        each j in b.modules(), for each k in j.parameters() (recursive) with requires_grad,
        yield k. A parameter thus appears once per walked module that contains it. Returns
        `(name, parameter, count)` in first-yield order; for ResNet-101 that is 310 tensors,
        940 yields (297 block tensors ×3, 12 downsample tensors ×4, conv1.weight ×1).
        """
        counts: Counter[int] = Counter()
        order: list[nn.Parameter] = []
        for name in BACKBONE_MODULES:
            for j in getattr(self, name).modules():
                for k in j.parameters():
                    if k.requires_grad:
                        if id(k) not in counts:
                            order.append(k)
                        counts[id(k)] += 1
        names = {id(p): n for n, p in self.named_parameters()}
        return [(names[id(p)], p, counts[id(p)]) for p in order]


def run_float32(module: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
    """`module(*xs)` in float32 with autocast off (inputs promoted to float32)."""
    with torch.autocast(device_type=xs[0].device.type, enabled=False):
        return module(*(x.float() for x in xs))


def upsample_like(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling (`align_corners=False`) to `size` (h, w), as the release does."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
