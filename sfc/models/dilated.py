"""The backbone's dilated 3×3 convolutions as ordinary ones on a space-to-batch view (issue 18).

DeepLab-v2 keeps output stride 8 by dilating the 3×3 convolutions of `layer3` (dilation 2) and
`layer4` (dilation 4), padding = dilation. Such a convolution never mixes pixels of different
phases: output pixel (y, x) reads only the inputs (y + k·d, x + l·d), k, l ∈ {-1, 0, 1}, all of
phase (y mod d, x mod d). So it equals an ordinary 3×3 convolution (padding 1) applied to the d²
sub-images of the input, stacked along the batch ("space to batch", as TensorFlow once ran
atrous convolutions), with the outputs put back in place. A map whose size is not a multiple of
d is padded with zeros at the bottom and right first (those rows and columns lie inside the
dilated convolution's own zero padding) and the output cropped.

`set_dilated_impl("s2b")` / `dilated_impl("s2b")` runs every `Bottleneck.conv2` with d > 1 this
way (the parameters and state-dict keys are the same `nn.Conv2d`'s); "native" (default) runs the
`nn.Conv2d`. Same products and sums per output; only the convolution algorithm — hence the
summation order — may differ (float64: equal to 1e-12, tests). Whether it is faster depends on
the convolution library's kernels for dilated against ordinary convolutions on the GPU at
batch 1: `python -m sfc.bench.convs` measures both at the faithful sizes; until it has, this is
an opt-in switch (`sfc.train --dilated-impl`, `sfc.bench --dilated-impl`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .switch import ImplSwitch

MODES = ("native", "s2b")
_SWITCH = ImplSwitch("dilated-convolution implementation", MODES, "native")


def set_dilated_impl(mode: str) -> None:
    """Choose how the backbone's dilated convolutions run, process-wide."""
    _SWITCH.set(mode)


def get_dilated_impl() -> str:
    return _SWITCH.get()


def dilated_impl(mode: str):
    """Temporarily set the implementation (e.g. "native" for a release-style reference)."""
    return _SWITCH.context(mode)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def s2b_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               dilation: int) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=d, dilation=d)` for a 3×3 `weight`, stride 1, as an
    ordinary 3×3 convolution on the d² phase sub-images of `x` (module docstring)."""
    d = int(dilation)
    b, c, h, w = x.shape
    hp, wp = -(-h // d), -(-w // d)
    fmt = _memory_format(x)
    if (hp * d, wp * d) != (h, w):
        x = F.pad(x, (0, wp * d - w, 0, hp * d - h))
    # x[b, c, i·d + p, j·d + q] → z[b·d² + p·d + q, c, i, j]
    z = x.reshape(b, c, hp, d, wp, d).permute(0, 3, 5, 1, 2, 4).reshape(b * d * d, c, hp, wp)
    y = F.conv2d(z.contiguous(memory_format=fmt), weight, bias, stride=1, padding=1)
    co = y.shape[1]
    # y[b·d² + p·d + q, co, i, j] → out[b, co, i·d + p, j·d + q]
    out = y.reshape(b, d, d, co, hp, wp).permute(0, 3, 4, 1, 5, 2).reshape(b, co, hp * d, wp * d)
    return out[:, :, :h, :w].contiguous(memory_format=fmt)


def _eligible(conv: nn.Conv2d) -> bool:
    d = conv.dilation
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and d[0] == d[1] > 1
            and conv.padding == d and conv.groups == 1 and conv.padding_mode == "zeros")


def dilated_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`, through `s2b_conv2d` when "s2b" is set and `conv` is a dilated 3×3
    convolution with padding = dilation (the backbone's)."""
    if _SWITCH.mode == "s2b" and _eligible(conv):
        return s2b_conv2d(x, conv.weight, conv.bias, conv.dilation[0])
    return conv(x)


__all__ = ["MODES", "dilated_conv", "dilated_impl", "get_dilated_impl", "s2b_conv2d",
           "set_dilated_impl"]
