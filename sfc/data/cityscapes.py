"""Cityscapes-Seq (target and evaluation), method §2.3.

Layout: ``Cityscapes/leftImg8bit_sequence/{train,val}/CITY/CITY_SSSSSS_FFFFFF_leftImg8bit.png``
and ``Cityscapes/gtFine/{train,val}/CITY/CITY_SSSSSS_FFFFFF_gtFine_labelIds.png``. Annotated frames
are those with a gtFine label (2,975 train, 500 val: the 20th frame of each snippet, ``…_000019``).
``classes=15`` maps rider to person (VIPER protocol); ``classes=12`` keeps rider (SYNTHIA-Seq).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from sfc.data.base import ClipDataset
from sfc.data.flow_io import read_flo, resize_flow
from sfc.data.classes import CITYSCAPES_LUT_12, CITYSCAPES_LUT_15, CITYSCAPES_NUM_IDS
from sfc.data.io import (
    DatasetError,
    check_ids,
    list_dirs,
    list_files,
    read_index_label,
    read_list_file,
    require_dir,
    resize_label,
)

CS_FLOW_DIR = "flow_synthetic"  # the synthetic target's ground-truth flow (docs/flow.md)
_NAME = re.compile(r"([A-Za-z]+)_(\d{6})_(\d{6})")
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def parse_cityscapes_entry(line: str) -> tuple[str, str, int]:
    """``train_aachen_000000_000019``, ``aachen/aachen_000000_000019_leftImg8bit.png`` ...
    -> ("aachen", "000000", 19)."""
    m = _NAME.search(Path(line.split()[0]).name)
    if not m:
        raise DatasetError(f"Cityscapes list entry {line!r} is not of the form "
                           "CITY/CITY_SSSSSS_FFFFFF or split_CITY_SSSSSS_FFFFFF")
    return m.group(1), m.group(2), int(m.group(3))


class CityscapesSeq(ClipDataset):
    """Clips of ``frames`` frames ending at an annotated frame f: (f-T+1, ..., f).

    ``frames=3`` is the stage-two target sample (f-2, f-1, f). Item: "seg", "flow"
    (3, T, H, W) float32, "label" (H, W) int64 train ids of frame f, "name"
    "CITY_SSSSSS_FFFFFF". ``size`` (W, H), None keeps the files' size. ``raw``: "bgr" uint8
    instead of "seg"/"flow" (``ClipDataset``). ``after``: the clip goes on for that many frames
    past f, (f-T+1, ..., f, ..., f+after) — ``frames=20, after=10`` is a whole 30-frame
    snippet (the published temporal-consistency convention); the label stays frame f's.
    """

    dataset_name = "Cityscapes"

    def __init__(self, root, split="val", frames=2, size=(1024, 512), classes=15,
                 list_file=None, raw=False, gt_flow=False, after=0):
        super().__init__(root, frames, size, raw)
        self.gt_flow = bool(gt_flow)
        if int(after) < 0:
            raise ValueError(f"after must be >= 0, got {after}")
        self.after = int(after)
        if classes not in (15, 12):
            raise ValueError(f"classes must be 15 (VIPER protocol) or 12 (SYNTHIA-Seq), "
                             f"got {classes}")
        self.split = split
        self.num_classes = classes
        self.lut = CITYSCAPES_LUT_15 if classes == 15 else CITYSCAPES_LUT_12
        self.require_root("Cityscapes/{leftImg8bit_sequence,gtFine}/{train,val}/CITY/...")
        self.img_dir = require_dir(self.root / "leftImg8bit_sequence" / split,
                                   f"Cityscapes sequence images ({split})")
        self.gt_dir = require_dir(self.root / "gtFine" / split, f"Cityscapes labels ({split})")
        if list_file is not None:
            self.items = [parse_cityscapes_entry(ln) for ln in read_list_file(list_file)]
        else:
            self.items = self._scan()
        self.require_items(self.gt_dir)

    def _scan(self) -> list[tuple[str, str, int]]:
        items = []
        for city in list_dirs(self.gt_dir):
            for fname in list_files(self.gt_dir / city, _LABEL_SUFFIX):
                m = _NAME.fullmatch(fname[: -len(_LABEL_SUFFIX)])
                if m:
                    items.append((m.group(1), m.group(2), int(m.group(3))))
        return items

    def unlabelled_snippets(self) -> list[str]:
        """``CITY_SSSSSS`` of every snippet with frames under ``leftImg8bit_sequence`` but no
        ``gtFine`` label (not evaluated: a missing or misplaced label file)."""
        labelled = {(c, q) for c, q, _ in self.items}
        found = set()
        for city in list_dirs(self.img_dir):
            for fname in list_files(self.img_dir / city, "_leftImg8bit.png"):
                m = _NAME.match(fname)
                if m:
                    found.add((m.group(1), m.group(2)))
        return [f"{c}_{q}" for c, q in sorted(found - labelled)]

    def image_path(self, city: str, seq: str, f: int) -> Path:
        return self.img_dir / city / f"{city}_{seq}_{f:06d}_leftImg8bit.png"

    def label_path(self, city: str, seq: str, f: int) -> Path:
        return self.gt_dir / city / f"{city}_{seq}_{f:06d}{_LABEL_SUFFIX}"

    def __getitem__(self, i: int) -> dict:
        city, seq, f = self.items[i]
        name = f"{city}_{seq}_{f:06d}"
        paths = [self.image_path(city, seq, t) for t in self.clip_frames(f)]
        for p in paths[self.frames:]:
            if not p.is_file():
                raise DatasetError(f"{self.dataset_name}: missing frame {p} (a clip goes on "
                                   f"{self.after} frames past annotated frame {name}; real "
                                   "snippets hold 30 frames, the 20th annotated)")
        item = self.read_clip(paths, name)
        label_path = self.label_path(city, seq, f)
        ids = read_index_label(label_path, "Cityscapes labelIds")
        check_ids(ids, CITYSCAPES_NUM_IDS, label_path, "Cityscapes labelIds")
        label = self.lut[resize_label(ids, self.size)]
        item.update(label=self.label_tensor(label), name=name)
        if self.gt_flow:
            item["flow_gt"] = self._gt_flows(city, seq, f, label.shape)
        return item

    def clip_frames(self, f: int) -> range:
        """Frame numbers of the clip around annotated frame f, oldest first."""
        return range(f - self.frames + 1, f + self.after + 1)

    def flow_path(self, city: str, seq: str, f: int) -> Path:
        """The synthetic tree's forward flow f → f+1 (real Cityscapes has none)."""
        return self.root / CS_FLOW_DIR / self.split / city / f"{city}_{seq}_{f:06d}_flow.flo"

    def _gt_flows(self, city: str, seq: str, f: int, shape) -> torch.Tensor:
        """(T, 2, H, W) float32: the forward flow t → t+1 of each clip frame at the item's size,
        NaN where invalid; the last frame's is all NaN when its file is absent (its successor
        is outside the clip), any other missing file is an error."""
        out, frames = [], self.clip_frames(f)
        for t in frames:
            path = self.flow_path(city, seq, t)
            if t == frames[-1] and not path.is_file():
                out.append(np.full((*shape, 2), np.nan, np.float32))
                continue
            if not path.is_file():
                raise DatasetError(f"Cityscapes: missing ground-truth flow {path} (only the "
                                   "synthetic tree of python -m sfc.data.synthetic has it; "
                                   "use --tc-flow flownet on real data)")
            flow = read_flo(path)
            out.append(resize_flow(flow, self.size) if self.size else flow)
        return torch.from_numpy(np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)))
