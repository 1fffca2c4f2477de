"""Backward warping by optical flow (SPEC §3.3), pure PyTorch.

The release's compiled CUDA warp samples `x` bilinearly at `(i + u, j + v)` and clamps each of
the four corner indices to the image. That equals `grid_sample(bilinear, padding_mode='border',
align_corners=True)` on a grid of pixel coordinates (values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`out(p) = x(p + flow(p))`; x `B×C×H×W`, flow `B×2×H×W` (u = x/column, v = y/row, pixels).

    Differentiable in `x` and `flow`. Result dtype is `x`'s.
    """
    if x.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"warp expects x B×C×H×W and flow B×2×H×W, got {tuple(x.shape)} "
                         f"and {tuple(flow.shape)}")
    if x.shape[0] != flow.shape[0] or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} must have the "
                         "same batch and spatial size")
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=flow.device, dtype=flow.dtype).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=flow.dtype).view(1, 1, w)
    # Normalise to [-1, 1] for align_corners=True; a size-1 axis maps every coordinate to 0.
    gx = (xs + flow[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0  # (B, H, W)
    gy = (ys + flow[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=3).to(x.dtype)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
