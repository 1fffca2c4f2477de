"""What the three clip datasets share: argument checks, clip assembly, the item dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sfc.data.io import DatasetError, clip_arrays, clip_bgr, read_rgb


def check_size(size) -> tuple[int, int] | None:
    """``size`` is (W, H) in PIL order, or None for "keep the file's size"."""
    if size is None:
        return None
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be (W, H) with positive ints, got {size!r}")
    return int(size[0]), int(size[1])


class ClipDataset(Dataset):
    """Base: ``self.items`` lists annotated frames; subclasses say where files live.

    ``raw=True``: items carry the clip as "bgr" (3, T, H, W) uint8 instead of the float32
    "seg" and "flow"; ``sfc.data.io.normalise_batch`` (called by ``sfc.train.streams.to_device``
    after the copy) makes the same "seg"/"flow", bit for bit, on the device. Training uses it:
    workers skip the float work and send 8× fewer bytes.
    """

    dataset_name = "dataset"

    def __init__(self, root, frames: int, size, raw: bool = False):
        self.root = Path(root)
        self.raw = bool(raw)
        if int(frames) < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frames = int(frames)
        self.size = check_size(size)
        self.items: list = []

    def __len__(self) -> int:
        return len(self.items)

    def require_root(self, layout_hint: str) -> None:
        if not self.root.is_dir():
            raise DatasetError(f"{self.dataset_name} root {self.root} does not exist; expected "
                               f"{layout_hint} (set SFC_DATA or --data to the data root)")

    def require_items(self, where: Path) -> None:
        if not self.items:
            raise DatasetError(f"{self.dataset_name}: no annotated frames found under {where}")

    def read_clip(self, paths: list[Path], name: str, keep_rows=None) -> dict:
        """T frame files (oldest first, the last one annotated) -> {"seg", "flow"}: tensors
        (3, T, H, W) float32; with ``raw``: {"bgr": (3, T, H, W) uint8}."""
        for p in paths[:-1]:
            if not p.is_file():
                raise DatasetError(f"{self.dataset_name}: missing previous frame {p} (clip of "
                                   f"{self.frames} frames ending at annotated frame {name})")
        rgb = [read_rgb(p, self.size, keep_rows) for p in paths]
        if self.raw:
            return {"bgr": torch.from_numpy(clip_bgr(rgb))}
        seg, flow = clip_arrays(rgb)
        return {"seg": torch.from_numpy(seg), "flow": torch.from_numpy(flow)}

    @staticmethod
    def label_tensor(train_ids: np.ndarray) -> torch.Tensor:
        """(H, W) int64 train ids (-1 ignore)."""
        return torch.from_numpy(np.ascontiguousarray(train_ids, dtype=np.int64))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, {len(self)} clips, "
                f"frames={self.frames}, size={self.size}{', raw' if self.raw else ''})")
