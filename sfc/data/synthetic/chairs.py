"""A domain-neutral synthetic Flying Chairs set, in the real dataset's layout (docs/flow.md).

    python -m sfc.data.synthetic --flying-chairs DIR [--count N] [--chairs-size WxH]

writes ``DIR/FlyingChairs_release/data/NNNNN_img1.ppm``, ``NNNNN_img2.ppm``, ``NNNNN_flow.flo``
(numbered from 00001) and ``DIR/FlyingChairs_train_val.txt`` (one line per sample, in order:
1 = train, 2 = val; every 10th sample is val). As in Flying Chairs (Dosovitskiy et al., ICCV
2015), each pair is a textured background and several textured shapes ("chairs"), each layer
moved by its own random affine transformation between the two images; the flow is dense (every
pixel of image 1 has the displacement of the top layer there, also where it becomes hidden or
leaves the frame). Textures and colours are random: neither the source nor the target style.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from sfc.data.flow_io import write_flo

CHAIRS_SIZE = (512, 384)  # the real Flying Chairs size (W, H)
VAL_EVERY = 10  # sample i (1-based) is val when i % 10 == 0


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) float32 RGB 0-255: smooth colour blobs, fine noise and random stripes."""
    base = rng.uniform(0, 255, (rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
    img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)
    cells = int(rng.integers(12, 40))
    fine = rng.uniform(-1, 1, (cells, cells, 1)).astype(np.float32)
    img += rng.uniform(30, 80) * cv2.resize(fine, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
    if rng.random() < 0.6:  # stripes or a checker: strong edges in some direction
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ang, period = rng.uniform(0, np.pi), rng.uniform(4, 24) * w / 128
        phase = (xx * np.cos(ang) + yy * np.sin(ang)) / period
        pat = (np.floor(phase) % 2) if rng.random() < 0.5 else \
            (np.floor(phase) + np.floor((-xx * np.sin(ang) + yy * np.cos(ang)) / period)) % 2
        img += (pat[..., None] - 0.5) * rng.uniform(30, 90) * rng.uniform(-1, 1, 3)
    return np.clip(img, 0, 255)


def _shape_mask(rng: np.random.Generator, s: int) -> np.ndarray:
    """(s, s) uint8 0/1: a union of 2-4 rotated rectangles and ellipses ("a chair")."""
    m = np.zeros((s, s), np.uint8)
    for _ in range(rng.integers(2, 5)):
        c = tuple(float(v) for v in rng.uniform(0.3 * s, 0.7 * s, 2))
        axes = tuple(float(v) for v in rng.uniform(0.08 * s, 0.3 * s, 2))
        ang = float(rng.uniform(0, 180))
        if rng.random() < 0.5:
            pts = cv2.boxPoints((c, (2 * axes[0], 2 * axes[1]), ang)).astype(np.int32)
            cv2.fillPoly(m, [pts], 1)
        else:
            cv2.ellipse(m, (c, (2 * axes[0], 2 * axes[1]), ang), 1, -1)
    return m


def _affine(scale: float, angle_deg: float, tx: float, ty: float, cx: float, cy: float):
    """3×3: rotate by ``angle`` and scale about (cx, cy), then translate by (tx, ty)."""
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D((cx, cy), angle_deg, scale)
    m[0, 2] += tx
    m[1, 2] += ty
    return m


def chairs_pair(rng: np.random.Generator, w: int, h: int, motion: float = 1.0):
    """One sample → (img1, img2) (h, w, 3) uint8 RGB and the flow (h, w, 2) float32 of image 1's
    pixels into image 2 (pixels; dense). ``motion`` scales the random translations."""
    layers = []  # (texture, mask or None, A1 (canonical → image 1), A2 (→ image 2))
    bw, bh = int(w * 1.5), int(h * 1.5)  # background larger than the frame: no borders
    a1 = _affine(1.0, 0.0, -(bw - w) / 2, -(bh - h) / 2, 0, 0)
    move = _affine(1 + rng.normal(0, 0.015), rng.normal(0, 1.5), *rng.normal(0, 0.015 * w * motion, 2),
                   w / 2, h / 2)
    layers.append((_texture(rng, bw, bh), None, a1, move @ a1))
    for _ in range(rng.integers(4, 10)):
        s = int(max(8, min(w, h) * rng.uniform(0.4, 0.8)))
        place = _affine(rng.uniform(0.7, 1.3), rng.uniform(-180, 180),
                        rng.uniform(0, w) - s / 2, rng.uniform(0, h) - s / 2, s / 2, s / 2)
        cx, cy = (place @ np.array([s / 2, s / 2, 1.0]))[:2]
        move = _affine(1 + rng.normal(0, 0.04), rng.normal(0, 5.0), *rng.normal(0, 0.03 * w * motion, 2),
                       cx, cy)
        layers.append((_texture(rng, s, s), _shape_mask(rng, s), place, move @ place))
    imgs, top = [], np.zeros((h, w), np.int64)
    for i in (2, 3):
        img = np.zeros((h, w, 3), np.float32)
        for k, (tex, mask, a1, a2) in enumerate(layers):
            a = (a1 if i == 2 else a2)[:2]
            col = cv2.warpAffine(tex, a, (w, h), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT)
            if mask is None:
                img[:] = col
                continue
            m = cv2.warpAffine(mask, a, (w, h), flags=cv2.INTER_NEAREST)
            img[m > 0] = col[m > 0]
            if i == 2:
                top[m > 0] = k
        img += rng.normal(0, 2.0, img.shape)
        imgs.append(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    pts = np.stack([xs, ys, np.ones_like(xs)])  # (3, h, w), image-1 pixel centres
    flow = np.zeros((h, w, 2), np.float32)
    for k, (_, _, a1, a2) in enumerate(layers):
        sel = top == k
        if sel.any():
            m = a2 @ np.linalg.inv(a1)  # image 1 → image 2 for layer k
            p = pts[:, sel]
            flow[sel] = ((m @ p)[:2] - p[:2]).T
    return imgs[0], imgs[1], flow


def write_flying_chairs(out_dir, count: int = 2000, size=CHAIRS_SIZE, seed: int = 0,
                        progress: bool = False, motion: float = 1.0) -> int:
    """Write ``count`` samples under ``out_dir`` (see the module docstring); returns count.
    ``motion`` scales the translations (1: about 3 % of the width for a shape, as the real set's
    displacements relative to its 512 px)."""
    if count < VAL_EVERY:
        raise ValueError(f"--count {count}: at least {VAL_EVERY} (every 10th sample is val)")
    out = Path(out_dir)
    data = out / "FlyingChairs_release" / "data"
    data.mkdir(parents=True, exist_ok=True)
    w, h = int(size[0]), int(size[1])
    splits = []
    for i in tqdm(range(1, count + 1), desc="flying chairs", disable=not progress):
        rng = np.random.default_rng([seed, 3, i])
        img1, img2, flow = chairs_pair(rng, w, h, motion)
        Image.fromarray(img1).save(data / f"{i:05d}_img1.ppm")
        Image.fromarray(img2).save(data / f"{i:05d}_img2.ppm")
        write_flo(data / f"{i:05d}_flow.flo", flow)
        splits.append("2" if i % VAL_EVERY == 0 else "1")
    (out / "FlyingChairs_train_val.txt").write_text("\n".join(splits) + "\n")
    return count
