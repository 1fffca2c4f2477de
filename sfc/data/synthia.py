"""SYNTHIA-Seq (source, 12 train classes / 11 evaluated), method §2.4 — the DA-VSN/TPS protocol.

Root: ``SynthiaSeq/SEQS-04-DAWN``, in either layout:
* original: ``RGB/Stereo_Left/Omni_F/NNNNNN.png`` + ``GT/LABELS/Stereo_Left/Omni_F/NNNNNN.png``;
* flattened (DA-VSN/TPS users): ``rgb/NNNNNN.png`` + ``label/NNNNNN.png``.
Labels are 16-bit PNGs, class id in the R channel. The bottom 120 of the native 760 rows are
cropped (1280×760 -> 1280×640); for trees of another height (the small synthetic ones) the same
fraction is cropped: ``round(H · 120 / 760)`` rows. Then images are resized BICUBIC and labels
NEAREST to ``size`` when it differs.

Splits: SYNTHIA-Seq has no val split. ``split="train"`` is every annotated frame (849 in the
real sequence, as DA-VSN); ``split="val"`` is the last ``val_frames`` of them (used to select
the SFM, method §5); ``holdout_val=True`` removes those from ``split="train"``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sfc.data.base import ClipDataset
from sfc.data.classes import SYNTHIA_LUT_12, SYNTHIA_NUM_IDS
from sfc.data.io import (
    DatasetError,
    check_ids,
    list_files,
    quarter_size,
    read_list_file,
    read_synthia_label,
    resize_label,
)

ORIGINAL_LAYOUT = ("RGB/Stereo_Left/Omni_F", "GT/LABELS/Stereo_Left/Omni_F")
FLAT_LAYOUT = ("rgb", "label")
NATIVE_HEIGHT, CROP_ROWS = 760, 120
_NAME = re.compile(r"(\d+)")


def synthia_keep_rows(height: int) -> int:
    """Rows kept from the top of a SYNTHIA frame of ``height`` rows: 640 of 760."""
    return height - round(height * CROP_ROWS / NATIVE_HEIGHT)


def find_layout(root: Path) -> tuple[Path, Path]:
    """(image folder, label folder) of a SEQS-04-DAWN root in either layout."""
    for rgb, label in (ORIGINAL_LAYOUT, FLAT_LAYOUT):
        if (root / rgb).is_dir() and (root / label).is_dir():
            return root / rgb, root / label
    found = sorted(p.name for p in root.iterdir())[:10]
    raise DatasetError(f"SYNTHIA-Seq root {root}: expected {'/ + '.join(ORIGINAL_LAYOUT)}/ "
                       f"(original) or rgb/ + label/ (flattened), found {found}")


def parse_synthia_entry(line: str) -> int:
    """``000123``, ``000123.png`` or ``rgb/000123.png`` -> 123."""
    m = _NAME.fullmatch(Path(line.split()[0]).stem)
    if not m:
        raise DatasetError(f"SYNTHIA-Seq list entry {line!r} is not a frame id like 000123")
    return int(m.group(1))


class SynthiaSeq(ClipDataset):
    """Clips of ``frames`` SYNTHIA-Seq frames ending at an annotated frame.

    Item keys as ViperSeq (``prev_label`` adds "label_prev" and "label_down4x", ``raw`` gives
    "bgr"); "name" is the 6-digit frame id. ``size`` (W, H) after the crop; None keeps the cropped file size.
    """

    dataset_name = "SYNTHIA-Seq"
    num_classes = 12

    def __init__(self, root, split="train", frames=2, size=(1280, 640), prev_label=False,
                 list_file=None, val_frames=50, holdout_val=False, raw=False):
        super().__init__(root, frames, size, raw)
        if split not in ("train", "val"):
            raise ValueError(f"SYNTHIA-Seq split must be 'train' or 'val', got {split!r}")
        self.split = split
        self.prev_label = bool(prev_label)
        self.require_root("SynthiaSeq/SEQS-04-DAWN/{RGB,GT/LABELS}/Stereo_Left/Omni_F/NNNNNN.png "
                          "or .../{rgb,label}/NNNNNN.png")
        self.img_dir, self.label_dir = find_layout(self.root)
        if list_file is not None:
            self.items = [parse_synthia_entry(ln) for ln in read_list_file(list_file)]
        else:
            self.items = self._scan()
            if split == "val":
                self.items = self.items[-val_frames:] if val_frames > 0 else []
            elif holdout_val and val_frames > 0:
                self.items = self.items[:-val_frames]
        self.require_items(self.label_dir)

    def _scan(self) -> list[int]:
        have = set(list_files(self.img_dir, ".png"))
        items = []
        for fname in list_files(self.label_dir, ".png"):
            if not _NAME.fullmatch(fname[:-4]):
                continue
            f = int(fname[:-4])
            need = max(self.frames, 2)  # a predecessor always (000001..000849 as DA-VSN)
            if f - need + 1 >= 0 and all(f"{f - k:06d}.png" in have for k in range(1, need)):
                items.append(f)
        return items

    def image_path(self, f: int) -> Path:
        return self.img_dir / f"{f:06d}.png"

    def label_path(self, f: int) -> Path:
        return self.label_dir / f"{f:06d}.png"

    def read_ids(self, path: Path) -> np.ndarray:
        """(H', W) uint8 SYNTHIA ids of the cropped label, validated."""
        ids = read_synthia_label(path)
        check_ids(ids, SYNTHIA_NUM_IDS, path, "SYNTHIA-Seq")
        return ids[: synthia_keep_rows(ids.shape[0])]

    def __getitem__(self, i: int) -> dict:
        f = self.items[i]
        name = f"{f:06d}"
        paths = [self.image_path(f - k) for k in reversed(range(self.frames))]
        item = self.read_clip(paths, name, keep_rows=synthia_keep_rows)
        ids = self.read_ids(self.label_path(f))
        size = self.size or (ids.shape[1], ids.shape[0])
        item.update(label=self.label_tensor(SYNTHIA_LUT_12[resize_label(ids, size)]), name=name)
        if self.prev_label:
            prev_path = self.label_path(f - 1)
            if not prev_path.is_file():
                raise DatasetError(f"SYNTHIA-Seq: missing label of the previous frame {prev_path} "
                                   f"(needed with prev_label=True for {name})")
            item["label_prev"] = self.label_tensor(
                SYNTHIA_LUT_12[resize_label(self.read_ids(prev_path), size)])
            # two NEAREST steps (native crop -> size -> size/4), as VIPER's (method §4)
            item["label_down4x"] = self.label_tensor(
                SYNTHIA_LUT_12[resize_label(resize_label(ids, size), quarter_size(size))])
        return item
