"""Pictures: colourised labels, optical flow on the Middlebury colour wheel, image grids.

The one pictures module of the package (TensorBoard pictures drawn during training are composed
from these in :mod:`sfc.train.tb_pictures`). Everything returns ``H×W×3`` ``uint8`` RGB arrays
(numpy), so that the same images go to TensorBoard (``add_image(..., dataformats="HWC")``), PNG
files, videos and galleries. Flow colours are the Middlebury colour code (Baker et al., "A
Database and Evaluation Methodology for Optical Flow", IJCV 2011) as ``torchvision.utils.
flow_to_image`` draws it (tested equal), written here in NumPy so that no command pays for
importing torchvision (about a second per process); titles are a small PIL step on top.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from sfc.data.io import SEG_MEAN_BGR

IGNORE_COLOUR = (0, 0, 0)
TITLE_H = 14  # pixels of the title strip above a row with titles


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
    bgr = _numpy(seg) + SEG_MEAN_BGR[:, None, None]
    return np.clip(bgr[::-1].transpose(1, 2, 0), 0, 255).round().astype(np.uint8)


def denormalize_flow_input(img) -> np.ndarray:
    """FlowNet/SFM input ``3×H×W`` (BGR / 255) → RGB ``H×W×3`` uint8."""
    bgr = _numpy(img) * 255.0
    return np.clip(bgr[::-1].transpose(1, 2, 0), 0, 255).round().astype(np.uint8)


def _flow_tensor(flow) -> torch.Tensor:
    f = torch.as_tensor(_numpy(flow), dtype=torch.float32)
    if f.dim() != 3 or f.shape[0] != 2:
        raise ValueError(f"flow must be 2×H×W (u, v), got {tuple(f.shape)}")
    return f


def _colour_wheel() -> np.ndarray:
    """The Middlebury colour wheel: 55 hues, red → yellow → green → cyan → blue → magenta →
    red, segments of 15, 6, 4, 11, 13, 6 steps, (55, 3) float in 0..255."""
    segments = ((15, 0, 1, +1), (6, 1, 0, -1), (4, 1, 2, +1), (11, 2, 1, -1), (13, 2, 0, +1),
                (6, 0, 2, -1))  # (steps, the channel at 255, the channel that ramps, up/down)
    rows = []
    for n, full, ramp, sign in segments:
        seg = np.zeros((n, 3))
        seg[:, full] = 255
        up = np.floor(255 * np.arange(n) / n)
        seg[:, ramp] = up if sign > 0 else 255 - up
        rows.append(seg)
    return np.concatenate(rows)


_WHEEL = _colour_wheel()


def flow_to_image(flow: torch.Tensor) -> torch.Tensor:
    """Flow ``(N,) 2×H×W`` float → ``(N,) 3×H×W`` uint8 in the Middlebury colour code: hue =
    direction, saturation = magnitude relative to the largest in the batch (white = none)."""
    f = flow.detach().float().cpu().numpy()
    one = f.ndim == 3
    f = f[None] if one else f
    norm = np.sqrt((f ** 2).sum(axis=1))  # (N, H, W)
    scale = norm.max() + np.finfo(np.float32).eps
    u, v, norm = f[:, 0] / scale, f[:, 1] / scale, norm / scale
    n = len(_WHEEL)
    fk = (np.arctan2(-v, -u) / np.pi + 1) / 2 * (n - 1)  # position on the wheel
    k0 = np.floor(fk).astype(np.int64)
    k1 = np.where(k0 + 1 == n, 0, k0 + 1)
    frac = (fk - k0)[..., None]
    col = (1 - frac) * _WHEEL[k0] / 255.0 + frac * _WHEEL[k1] / 255.0  # (N, H, W, 3)
    col = 1 - norm[..., None] * (1 - col)
    img = torch.from_numpy(np.floor(255 * col).astype(np.uint8)).permute(0, 3, 1, 2)
    return img[0] if one else img


def flows_to_rgb(flows: Sequence) -> list[np.ndarray]:
    """Flows ``2×H×W`` (u, v; equal sizes) → ``H×W×3`` uint8 images on **one** colour scale:
    hue = direction, saturation = magnitude relative to the largest of all (white = no
    motion). ``flow_to_image`` normalises by the maximum over its batch, so one call does it."""
    batch = torch.stack([_flow_tensor(f) for f in flows])  # (N, 2, H, W)
    return [im.permute(1, 2, 0).numpy() for im in flow_to_image(batch)]


def flow_to_rgb(flow, max_mag: float | None = None) -> np.ndarray:
    """One flow ``2×H×W`` → ``H×W×3`` uint8 (``torchvision.utils.flow_to_image``).

    ``max_mag`` fixes the magnitude drawn fully saturated (default: the image's largest).
    ``flow_to_image`` has no such argument, so magnitudes are clipped to ``max_mag`` and one
    sentinel pixel of magnitude ``max_mag`` is appended (and cut off again) to set its scale.
    """
    f = _flow_tensor(flow)
    if not max_mag:
        return flow_to_image(f).permute(1, 2, 0).numpy()
    mag = f.norm(dim=0, keepdim=True)
    f = f * torch.clamp(max_mag / mag.clamp(min=1e-12), max=1.0)
    sentinel = torch.zeros(2, f.shape[1], 1)
    sentinel[0, 0, 0] = float(max_mag)
    img = flow_to_image(torch.cat((f, sentinel), dim=2))[:, :, :-1]
    return img.permute(1, 2, 0).numpy()


def resize_nearest(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``H×W×3`` uint8 image to ``size = (W, H)`` without smoothing."""
    if img.shape[1] == size[0] and img.shape[0] == size[1]:
        return img
    return np.asarray(Image.fromarray(img).resize(size, Image.NEAREST))


def _grid(images: Sequence[np.ndarray], nrow: int, pad: int) -> np.ndarray:
    """Equal-size ``H×W×3`` uint8 images in rows of ``nrow``, ``pad`` white pixels between them
    (no outer border)."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // nrow)
    out = np.full((rows * (h + pad) - pad, nrow * (w + pad) - pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = im[..., :3]
    return out


def side_by_side(
    images: Sequence[np.ndarray], titles: Sequence[str] | None = None, pad: int = 4
) -> np.ndarray:
    """Put ``H×W×3`` images in one row (all resized to the first one's size), with titles."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    h, w = images[0].shape[:2]
    row = _grid([resize_nearest(np.asarray(im, np.uint8)[..., :3], (w, h)) for im in images],
                nrow=len(images), pad=pad)
    if not titles:
        return row
    pil = Image.fromarray(np.pad(row, ((TITLE_H, 0), (0, 0), (0, 0)), constant_values=255))
    draw = ImageDraw.Draw(pil)
    for i, title in enumerate(titles):
        draw.text((i * (w + pad) + 2, 1), str(title), fill=(0, 0, 0))
    return np.asarray(pil)


def stack_rows(rows: Sequence[np.ndarray], pad: int = 4) -> np.ndarray:
    """Stack images vertically (padding the narrower ones on the right with white).

    The rows may differ in height (a titled row above an untitled one)."""
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
