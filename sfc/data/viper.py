"""VIPER (source, 15 classes), method §2.2.

Layout: ``VIPER/{train,val}/img/SSS/SSS_NNNNN.jpg`` and ``VIPER/{train,val}/cls/SSS/SSS_NNNNN.png``
(palette PNG, index = VIPER class id). Annotated frames: frame number a multiple of 10 whose
predecessor image exists (the release's 13,367-frame train list), and for ``frames > 2`` all
``frames - 1`` predecessors. Labels: resized NEAREST, ego vehicle removed, mapped to the 15
train ids.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sfc.data.base import ClipDataset
from sfc.data.classes import VIPER_LUT_15, VIPER_NUM_IDS
from sfc.data.io import (
    DatasetError,
    check_ids,
    list_dirs,
    list_files,
    quarter_size,
    read_index_label,
    read_list_file,
    remove_ego_vehicle,
    require_dir,
    resize_label,
)

_NAME = re.compile(r"(\d+)_(\d+)")
# The release's VIPER val list (method §2.2): 10 random frames from each of 46 val sequences,
# 460 entries (one duplicated); the SFM is selected on it. Shipped with the package.
RELEASE_VAL_LIST = Path(__file__).resolve().parent / "lists" / "viper_val.txt"


def parse_viper_entry(line: str) -> tuple[str, int]:
    """``001/001_00010.jpg``, ``001_00010.png`` or ``001_00010`` -> ("001", 10)."""
    m = _NAME.search(Path(line.split()[0]).name)
    if not m:
        raise DatasetError(f"VIPER list entry {line!r} is not of the form SSS/SSS_NNNNN.jpg")
    return m.group(1), int(m.group(2))


def release_val_list(root) -> Path | None:
    """`RELEASE_VAL_LIST` if every frame it names (and its predecessor image) is under the
    VIPER ``root``'s val split, else None (e.g. a synthetic tree)."""
    val = Path(root) / "val"
    for line in read_list_file(RELEASE_VAL_LIST):
        seq, f = parse_viper_entry(line)
        for k in (0, 1):
            if not (val / "img" / seq / f"{seq}_{f - k:05d}.jpg").is_file():
                return None
        if not (val / "cls" / seq / f"{seq}_{f:05d}.png").is_file():
            return None
    return RELEASE_VAL_LIST


class ViperSeq(ClipDataset):
    """Clips of ``frames`` VIPER frames ending at an annotated frame.

    Item: "seg", "flow" (3, T, H, W) float32; "label" (H, W) int64; "name" "SSS_NNNNN";
    with ``prev_label``: "label_prev" (H, W) (frame f-1) and "label_down4x" (ceil(H/4),
    ceil(W/4)), made native -> size -> size/4 with PIL NEAREST, ego removal and map at 1/4.
    ``size`` (W, H), None keeps the files' size. ``raw``: "bgr" uint8 instead of "seg"/"flow"
    (``ClipDataset``).
    """

    dataset_name = "VIPER"
    num_classes = 15

    def __init__(self, root, split="train", frames=2, size=(1280, 720), prev_label=False,
                 list_file=None, raw=False):
        super().__init__(root, frames, size, raw)
        self.split = split
        self.prev_label = bool(prev_label)
        self.require_root("VIPER/{train,val}/{img,cls}/SSS/SSS_NNNNN.{jpg,png}")
        base = require_dir(self.root / split, f"VIPER split {split!r}")
        self.img_dir = require_dir(base / "img", "VIPER images")
        self.cls_dir = require_dir(base / "cls", "VIPER labels")
        if list_file is not None:
            self.items = [parse_viper_entry(ln) for ln in read_list_file(list_file)]
        else:
            self.items = self._scan()
        self.require_items(self.cls_dir)

    def _scan(self) -> list[tuple[str, int]]:
        items = []
        for seq in list_dirs(self.cls_dir):
            img_seq = self.img_dir / seq
            have = set(list_files(img_seq, ".jpg")) if img_seq.is_dir() else set()
            for fname in list_files(self.cls_dir / seq, ".png"):
                m = _NAME.fullmatch(fname[:-4])
                if not m or int(m.group(2)) % 10:
                    continue
                f = int(m.group(2))
                # the release's rule: a predecessor image exists (more for longer clips)
                need = max(self.frames, 2)
                if f - need + 1 >= 0 and all(f"{seq}_{f - k:05d}.jpg" in have
                                             for k in range(1, need)):
                    items.append((seq, f))
        return items

    def image_path(self, seq: str, f: int) -> Path:
        return self.img_dir / seq / f"{seq}_{f:05d}.jpg"

    def label_path(self, seq: str, f: int) -> Path:
        return self.cls_dir / seq / f"{seq}_{f:05d}.png"

    def read_ids(self, path: Path) -> np.ndarray:
        """(H, W) uint8 VIPER ids of a label file, validated."""
        ids = read_index_label(path, "VIPER")
        check_ids(ids, VIPER_NUM_IDS, path, "VIPER")
        return ids

    @staticmethod
    def map_label(ids: np.ndarray, size) -> np.ndarray:
        """VIPER ids -> (H, W) int64 train ids: NEAREST to ``size``, ego removal, LUT."""
        return VIPER_LUT_15[remove_ego_vehicle(resize_label(ids, size))]

    def __getitem__(self, i: int) -> dict:
        seq, f = self.items[i]
        name = f"{seq}_{f:05d}"
        label_path = self.label_path(seq, f)
        if not label_path.is_file():
            raise DatasetError(f"VIPER: missing label {label_path} of annotated frame {name}")
        paths = [self.image_path(seq, f - k) for k in reversed(range(self.frames))]
        item = self.read_clip(paths, name)
        ids = self.read_ids(label_path)
        size = self.size or (ids.shape[1], ids.shape[0])
        item.update(label=self.label_tensor(self.map_label(ids, size)), name=name)
        if self.prev_label:
            prev_path = self.label_path(seq, f - 1)
            if not prev_path.is_file():
                raise DatasetError(f"VIPER: missing label of the previous frame {prev_path} "
                                   f"(needed with prev_label=True for {name})")
            item["label_prev"] = self.label_tensor(self.map_label(self.read_ids(prev_path), size))
            # two NEAREST steps (native -> size -> size/4), ego removal and map at 1/4 (method §4)
            item["label_down4x"] = self.label_tensor(
                self.map_label(resize_label(ids, size), quarter_size(size)))
        return item
