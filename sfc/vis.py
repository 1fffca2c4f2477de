"""Pictures: colourised labels, optical flow on a colour wheel, and side-by-side panels.

Everything here returns ``H×W×3`` ``uint8`` RGB arrays (numpy), so that the same images go to
TensorBoard (``add_image(..., dataformats="HWC")``), to PNG files and into galleries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

# SegNet normalisation (SPEC §2.1): BGR, 0-255, minus this mean (B, G, R order).
SEG_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
IGNORE_COLOUR = (0, 0, 0)


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def colorize(label, palette) -> np.ndarray:
    """Train-id map ``H×W`` (ignore = -1 or any id outside the palette) → ``H×W×3`` uint8."""
    label = _numpy(label).astype(np.int64)
    palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    # One extra row for "ignore": the lookup table is the palette plus black.
    lut = np.concatenate([palette, np.array([IGNORE_COLOUR], dtype=np.uint8)], axis=0)
    idx = np.where((label >= 0) & (label < len(palette)), label, len(palette))
    return lut[idx]


def denormalize_seg(seg) -> np.ndarray:
    """SegNet input ``3×H×W`` (BGR, mean-subtracted) → RGB ``H×W×3`` uint8."""
    bgr = _numpy(seg) + np.asarray(SEG_MEAN_BGR, dtype=np.float32)[:, None, None]
    return np.clip(bgr[::-1].transpose(1, 2, 0), 0, 255).round().astype(np.uint8)


def denormalize_flow_input(img) -> np.ndarray:
    """FlowNet/SFM input ``3×H×W`` (BGR / 255) → RGB ``H×W×3`` uint8."""
    bgr = _numpy(img) * 255.0
    return np.clip(bgr[::-1].transpose(1, 2, 0), 0, 255).round().astype(np.uint8)


def _colour_wheel() -> np.ndarray:
    """The Middlebury colour wheel (Baker et al. 2011), ``55×3`` in 0-255."""
    ry, yg, gc, cb, bm, mr = 15, 6, 4, 11, 13, 6
    cols = []
    for n, start, end in (
        (ry, (255, 0, 0), (255, 255, 0)),
        (yg, (255, 255, 0), (0, 255, 0)),
        (gc, (0, 255, 0), (0, 255, 255)),
        (cb, (0, 255, 255), (0, 0, 255)),
        (bm, (0, 0, 255), (255, 0, 255)),
        (mr, (255, 0, 255), (255, 0, 0)),
    ):
        t = np.arange(n, dtype=np.float64)[:, None] / n
        cols.append(np.asarray(start, np.float64) * (1 - t) + np.asarray(end, np.float64) * t)
    return np.concatenate(cols, axis=0)


_WHEEL = _colour_wheel()


def flow_to_rgb(flow, max_mag: float | None = None) -> np.ndarray:
    """Flow ``2×H×W`` (u, v) → ``H×W×3`` uint8: hue = direction, saturation = magnitude.

    ``max_mag`` sets the magnitude shown fully saturated (default: the largest in the image),
    so that two flows can be drawn on the same scale.
    """
    u, v = _numpy(flow).astype(np.float64)
    mag = np.sqrt(u**2 + v**2)
    scale = float(max_mag) if max_mag else float(mag.max())
    rad = np.clip(mag / scale, 0, 1) if scale > 0 else np.zeros_like(mag)
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    ncols = len(_WHEEL)
    fk = (angle + 1) / 2 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64)
    k1 = (k0 + 1) % ncols
    f = (fk - k0)[..., None]
    col = (1 - f) * _WHEEL[k0] + f * _WHEEL[k1]  # H×W×3 in 0-255
    col = 255 - rad[..., None] * (255 - col)  # white at zero motion
    return np.clip(col, 0, 255).round().astype(np.uint8)


def resize_nearest(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``H×W×3`` uint8 image to ``size = (W, H)`` without smoothing."""
    if img.shape[1] == size[0] and img.shape[0] == size[1]:
        return img
    return np.asarray(Image.fromarray(img).resize(size, Image.NEAREST))


def side_by_side(
    images: Sequence[np.ndarray], titles: Sequence[str] | None = None, pad: int = 4
) -> np.ndarray:
    """Put ``H×W×3`` images in one row (all resized to the first one's size), with titles."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    h, w = images[0].shape[:2]
    title_h = 14 if titles else 0
    n = len(images)
    canvas = np.full((h + title_h, n * w + (n - 1) * pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        img = resize_nearest(np.ascontiguousarray(img[..., :3]).astype(np.uint8), (w, h))
        canvas[title_h:, i * (w + pad) : i * (w + pad) + w] = img
    if titles:
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        for i, title in enumerate(titles):
            draw.text((i * (w + pad) + 2, 1), str(title), fill=(0, 0, 0))
        canvas = np.asarray(pil)
    return canvas


def stack_rows(rows: Sequence[np.ndarray], pad: int = 4) -> np.ndarray:
    """Stack images vertically (padding the narrower ones on the right with white)."""
    width = max(r.shape[1] for r in rows)
    out = []
    for i, r in enumerate(rows):
        if r.shape[1] < width:
            r = np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
        out.append(r)
        if i < len(rows) - 1:
            out.append(np.full((pad, width, 3), 255, dtype=np.uint8))
    return np.concatenate(out, axis=0)


def save_png(img: np.ndarray, path) -> None:
    Image.fromarray(np.ascontiguousarray(img)).save(path)
