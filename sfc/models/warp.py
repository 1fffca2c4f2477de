"""Backward warping by optical flow (method §3.3), pure PyTorch.

The release's compiled CUDA warp samples `x` bilinearly at `(i + u, j + v)` and clamps each of
the four corner indices to the image. That equals `grid_sample(bilinear, padding_mode='border',
align_corners=True)` on a grid of pixel coordinates (values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`out(p) = x(p + flow(p))`; x `B×C×H×W`, flow `B×2×H×W` (u = x/column, v = y/row, pixels).

    Differentiable in `x` and `flow`. Computed in float32 (also under autocast); the result
    has `x`'s dtype.
    """
    if x.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"warp expects x B×C×H×W and flow B×2×H×W, got {tuple(x.shape)} "
                         f"and {tuple(flow.shape)}")
    if x.shape[0] != flow.shape[0] or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} must have the "
                         "same batch and spatial size")
    h, w = x.shape[-2:]
    # The grid is built and sampled in at least float32 whatever the flow's dtype: bf16
    # (autocast) holds integers exactly only up to 256, so pixel positions of a wider map would
    # be rounded by up to 2 pixels before sampling. The result is cast back to x's dtype.
    dt = torch.promote_types(torch.promote_types(x.dtype, flow.dtype), torch.float32)
    f = flow.to(dt)
    ys = torch.arange(h, device=flow.device, dtype=dt).view(1, h, 1)
    xs = torch.arange(w, device=flow.device, dtype=dt).view(1, 1, w)
    # Normalise to [-1, 1] for align_corners=True; a size-1 axis maps every coordinate to 0.
    gx = (xs + f[:, 0]) * (2.0 / max(w - 1, 1)) - 1.0  # (B, H, W)
    gy = (ys + f[:, 1]) * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=3)  # (B, H, W, 2), float32 (or float64)
    with torch.autocast(device_type=x.device.type, enabled=False):
        out = F.grid_sample(x.to(dt), grid, mode="bilinear", padding_mode="border",
                            align_corners=True)
    return out.to(x.dtype)
