"""Decoding, resizing and normalising frames and labels (method §2.1), shared by the datasets.

Filters are the release's: PIL ``BICUBIC`` for images, PIL ``NEAREST`` for labels. Every read
failure becomes a ``DatasetError`` that names the file and what was expected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from sfc.data.classes import VIPER_CAR_ID

# SegNet input mean in B, G, R order, 0-255 (DeepLab-v2 / the release's IMG_MEAN).
SEG_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)


class DatasetError(ValueError):
    """A dataset tree or file is missing, misplaced or malformed; the message names the path."""


def require_dir(path: Path, what: str) -> Path:
    """Raise a DatasetError listing what was found when the folder ``path`` is missing."""
    path = Path(path)
    if path.is_dir():
        return path
    parent = path.parent
    if parent.is_dir():
        found = sorted(p.name for p in parent.iterdir())[:10]
        raise DatasetError(f"{what}: expected folder {path}, but {parent} contains "
                           f"{found if found else 'nothing'}")
    raise DatasetError(f"{what}: folder {path} does not exist")


def list_files(folder: Path, suffix: str) -> list[str]:
    """Sorted names of the files in ``folder`` ending in ``suffix`` (os.scandir, fast)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.name.endswith(suffix) and e.is_file())


def list_dirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir())


def _open(path: Path) -> Image.Image:
    if not Path(path).is_file():
        raise DatasetError(f"missing file {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file raises here, not later in a worker
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"unreadable or truncated image {path}: {e}") from None
    return img


def read_rgb(path: Path, size: tuple[int, int] | None = None,
             keep_rows: Callable[[int], int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB; only the top ``keep_rows(native H)`` rows kept (SYNTHIA's crop),
    then resized BICUBIC to ``size`` (W, H) when given and different."""
    img = _open(path).convert("RGB")
    if keep_rows is not None:
        img = img.crop((0, 0, img.width, keep_rows(img.height)))
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.BICUBIC)
    return np.asarray(img)


def resize_rgb(rgb: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB resized PIL-BICUBIC to ``size`` (W, H) (method §2.1); unchanged when
    ``size`` is None or already the array's."""
    if size is None or (rgb.shape[1], rgb.shape[0]) == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(tuple(size), Image.BICUBIC))


def read_index_label(path: Path, what: str) -> np.ndarray:
    """(H, W) uint8 class ids of a single-channel 8-bit PNG (mode 'P' or 'L')."""
    img = _open(path)
    if img.mode not in ("P", "L"):
        raise DatasetError(f"{what} label {path} has PIL mode {img.mode!r}; expected an 8-bit "
                           "single-channel PNG (mode 'P' palette or 'L') holding class ids")
    return np.asarray(img)


def read_synthia_label(path: Path) -> np.ndarray:
    """(H, W) uint8 SYNTHIA class ids from a 16-bit multi-channel PNG: the R channel.

    OpenCV returns BGR(A) order, so R is index 2 — not "the last channel", which is alpha in a
    4-channel file. PIL cannot read 16-bit RGB PNGs (method §2.4).
    """
    if not Path(path).is_file():
        raise DatasetError(f"missing file {path}")
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DatasetError(f"unreadable or truncated SYNTHIA label {path}")
    if arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] < 3:
        raise DatasetError(f"SYNTHIA label {path} is {arr.dtype} with shape {arr.shape}; expected "
                           "a 16-bit PNG with 3 or 4 channels (class id in the R channel)")
    ids = arr[:, :, 2]
    if ids.max() > 255:
        raise DatasetError(f"SYNTHIA label {path} has class id {int(ids.max())} in the R channel")
    return ids.astype(np.uint8)


def check_ids(ids: np.ndarray, num_ids: int, path: Path, what: str) -> None:
    """Raise when a label holds ids outside ``0 .. num_ids-1`` (a wrong or corrupted file)."""
    top = int(ids.max()) if ids.size else 0
    if top >= num_ids:
        bad = np.unique(ids[ids >= num_ids])[:8].tolist()
        raise DatasetError(f"{what} label {path} contains ids {bad} outside the known set "
                           f"0..{num_ids - 1}")


def resize_label(ids: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """PIL NEAREST resize of a uint8 id map to ``size`` (W, H) (the release's filter)."""
    if size is None or (ids.shape[1], ids.shape[0]) == tuple(size):
        return ids
    return np.asarray(Image.fromarray(ids).resize(tuple(size), Image.NEAREST))


def quarter_size(size: tuple[int, int]) -> tuple[int, int]:
    """(W, H) of the flow grid: ceil(W/4), ceil(H/4) — FlowNetS's output size (method §3.2)."""
    return math.ceil(size[0] / 4), math.ceil(size[1] / 4)


def remove_ego_vehicle(ids: np.ndarray) -> np.ndarray:
    """VIPER ids with the car component under the bottom-centre pixel set to 0 (unlabelled).

    Components of id 24 with 8-connectivity (OpenCV's default); the pixel is (H-1, W//2).
    """
    h, w = ids.shape
    if ids[h - 1, w // 2] != VIPER_CAR_ID:
        return ids
    car = (ids == VIPER_CAR_ID).astype(np.uint8)
    _, comp = cv2.connectedComponents(car, connectivity=8)
    out = ids.copy()
    out[comp == comp[h - 1, w // 2]] = 0
    return out


def seg_normalise(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 BGR in 0-255 minus the mean (SegNet input)."""
    bgr = rgb[:, :, ::-1].astype(np.float32) - SEG_MEAN_BGR
    return np.ascontiguousarray(bgr.transpose(2, 0, 1))


def flow_normalise(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 BGR / 255 (FlowNet / SFM input)."""
    bgr = rgb[:, :, ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(bgr.transpose(2, 0, 1))


def _check_clip(frames: list[np.ndarray]) -> None:
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise DatasetError(f"frames of one clip have different sizes {sorted(shapes)}; pass a "
                           "`size` to resize them")


def clip_arrays(frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """T RGB frames (oldest first) -> ("seg", "flow") arrays, each (3, T, H, W) float32."""
    _check_clip(frames)
    seg = np.stack([seg_normalise(f) for f in frames], axis=1)
    flow = np.stack([flow_normalise(f) for f in frames], axis=1)
    return seg, flow


def clip_bgr(frames: list[np.ndarray]) -> np.ndarray:
    """T RGB frames (oldest first) -> the raw clip, (3, T, H, W) uint8 BGR (`normalise_bgr`
    turns it into "seg" and "flow" on any device)."""
    _check_clip(frames)
    return np.ascontiguousarray(np.stack(frames, axis=0)[..., ::-1].transpose(3, 0, 1, 2))


# The two normalisations as float32 tables over the 256 byte values: entry v is computed with
# the same float32 operation as `seg_normalise` / `flow_normalise` apply to a pixel of value v,
# so looking the bytes up gives bit-identical inputs on any device (tests).
SEG_LUT = np.arange(256, dtype=np.float32)[None, :] - SEG_MEAN_BGR[:, None]  # (3, 256) B, G, R
FLOW_LUT = np.arange(256, dtype=np.float32) / 255.0  # (256,)
_DEVICE_LUTS: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def normalise_bgr(bgr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw clips `(..., 3, T, H, W)` uint8 BGR (any device) -> ("seg", "flow") float32 of the
    same shape, equal to what the datasets return without `raw` (method §2.1)."""
    if bgr.dtype != torch.uint8 or bgr.dim() < 4 or bgr.shape[-4] != 3:
        raise ValueError(f"normalise_bgr expects (..., 3, T, H, W) uint8 BGR clips, got "
                         f"{bgr.dtype} {tuple(bgr.shape)}")
    key = str(bgr.device)
    if key not in _DEVICE_LUTS:
        _DEVICE_LUTS[key] = (torch.from_numpy(SEG_LUT).reshape(-1).to(bgr.device),
                             torch.from_numpy(FLOW_LUT).to(bgr.device),
                             (torch.arange(3, device=bgr.device) * 256).view(3, 1, 1, 1))
    seg_lut, flow_lut, channel_offset = _DEVICE_LUTS[key]
    idx = bgr.long()
    return seg_lut[idx + channel_offset], flow_lut[idx]


def normalise_batch(batch: dict) -> dict:
    """A batch or item with a raw "bgr" clip -> the same with "seg" and "flow" instead (others
    are returned unchanged)."""
    if "bgr" not in batch:
        return batch
    seg, flow = normalise_bgr(batch["bgr"])
    out = {k: v for k, v in batch.items() if k != "bgr"}
    out["seg"], out["flow"] = seg, flow
    return out


def read_list_file(path: Path) -> list[str]:
    """Non-empty, non-comment lines of a frame list file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"list file {path} does not exist")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]
