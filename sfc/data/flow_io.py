"""Ground-truth optical flow on disk: Middlebury ``.flo`` and VIPER's ``.npz`` (docs/flow.md).

Every reader returns ``(H, W, 2)`` float32 — u (columns, x) then v (rows, y), in pixels of the
file's own resolution — with **NaN where the flow is invalid** (unknown, occluded or out of
frame, as the file marks it). Every read failure is a ``DatasetError`` naming the file.

* Middlebury ``.flo`` (Flying Chairs, Sintel, and the synthetic target's ground truth): the
  float32 magic 202021.25, int32 width and height, then ``H·W·2`` float32 (u, v interleaved,
  row-major), little-endian. Unknown flow is a component of magnitude > 1e9 (the Middlebury
  code writes 1e10); :func:`write_flo` writes invalid pixels that way.
* VIPER ``flow/SSS/SSS_NNNNN.npz``: float16 arrays ``u`` and ``v`` (H×W), NaN where invalid;
  a component of magnitude > 512 also counts as invalid (as other VIPER readers do).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfc.data.io import DatasetError

FLO_MAGIC = 202021.25
FLO_UNKNOWN = 1e10  # what the Middlebury code writes for unknown flow
FLO_UNKNOWN_THRESH = 1e9
VIPER_MAX = 512.0  # |u| or |v| above this: invalid (VIPER)


def write_flo(path, flow: np.ndarray) -> None:
    """(H, W, 2) flow → Middlebury ``.flo``; NaN (invalid) is written as 1e10."""
    flow = np.asarray(flow, np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"write_flo expects (H, W, 2) flow, got {flow.shape}")
    h, w = flow.shape[:2]
    data = np.where(np.isnan(flow), np.float32(FLO_UNKNOWN), flow).astype("<f4")
    with open(path, "wb") as f:
        f.write(np.array([FLO_MAGIC], "<f4").tobytes())
        f.write(np.array([w, h], "<i4").tobytes())
        f.write(data.tobytes())


def read_flo(path) -> np.ndarray:
    """Middlebury ``.flo`` → (H, W, 2) float32, NaN where unknown (|component| > 1e9)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing flow file {path}")
    raw = path.read_bytes()
    if len(raw) < 12 or np.frombuffer(raw[:4], "<f4")[0] != np.float32(FLO_MAGIC):
        raise DatasetError(f"{path} is not a Middlebury .flo file (expected the magic number "
                           f"{FLO_MAGIC} in its first 4 bytes)")
    w, h = (int(v) for v in np.frombuffer(raw[4:12], "<i4"))
    if w < 1 or h < 1 or len(raw) != 12 + 8 * w * h:
        raise DatasetError(f"{path}: truncated or malformed .flo ({len(raw)} bytes for a "
                           f"{w}x{h} header, expected {12 + 8 * max(w, 0) * max(h, 0)})")
    flow = np.frombuffer(raw[12:], "<f4").reshape(h, w, 2).astype(np.float32)
    bad = ~(np.abs(flow) <= FLO_UNKNOWN_THRESH).all(axis=2)  # NaN or unknown
    flow[bad] = np.nan
    return flow


def write_viper_flow(path, flow: np.ndarray) -> None:
    """(H, W, 2) flow → VIPER ``.npz`` (float16 ``u`` and ``v``, NaN where invalid)."""
    flow = np.asarray(flow, np.float32)
    np.savez_compressed(path, u=flow[:, :, 0].astype(np.float16),
                        v=flow[:, :, 1].astype(np.float16))


def read_viper_flow(path) -> np.ndarray:
    """VIPER ``.npz`` → (H, W, 2) float32, NaN where invalid (NaN, or |u| or |v| > 512)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"missing flow file {path}")
    try:
        with np.load(path) as z:
            if "u" not in z.files or "v" not in z.files:
                raise DatasetError(f"VIPER flow {path} holds arrays {z.files}; expected 'u' "
                                   "and 'v'")
            u, v = z["u"], z["v"]
    except DatasetError:
        raise
    except Exception as e:  # zip/pickle/truncation errors
        raise DatasetError(f"unreadable VIPER flow file {path}: {type(e).__name__}: {e}") \
            from None
    if u.shape != v.shape or u.ndim != 2:
        raise DatasetError(f"VIPER flow {path}: 'u' {u.shape} and 'v' {v.shape} must be two "
                           "H×W arrays")
    flow = np.stack([u, v], axis=2).astype(np.float32)
    flow[~(np.abs(flow) <= VIPER_MAX).all(axis=2)] = np.nan
    return flow


def resize_flow(flow: np.ndarray, size) -> np.ndarray:
    """(H, W, 2) flow with NaN → (h, w, 2) at ``size`` = (w, h): nearest sampling with PIL
    NEAREST's pixel phase (source index ⌊(i + ½)·H/h⌋), values scaled to the new pixels
    (u·w/W, v·h/H). NaN stays NaN: an invalid pixel never leaks into its neighbours."""
    h0, w0 = flow.shape[:2]
    w, h = int(size[0]), int(size[1])
    if (w, h) == (w0, h0):
        return flow.astype(np.float32, copy=True)
    rows = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(np.int64), h0 - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(np.int64), w0 - 1)
    out = flow[rows[:, None], cols[None, :]].astype(np.float32)
    out[:, :, 0] *= w / w0
    out[:, :, 1] *= h / h0
    return out
