"""Image pairs with ground-truth optical flow, for training and evaluating FlowNets
(docs/flow.md).

Every item is ``{"img1", "img2"}`` — (3, H, W) float32, FlowNet-normalised (BGR / 255, method
§2.1) — ``"flow_gt"`` (2, H, W) float32, the flow of image 1's pixels into image 2 in pixels of
the item's size, NaN where invalid, and ``"name"``. FlowNetS computes exactly that flow from
``cat[img1, img2]`` (SFC feeds ``cat[frame_t, frame_{t-1}]``: the flow of frame t into t-1).
Images are resized PIL-bicubic and flows by nearest sampling (``resize_flow``) to ``size``.

| set | layout under the data root | pairs | ground truth |
|---|---|---|---|
| ``flying_chairs`` | ``FlyingChairs/FlyingChairs_release/data/NNNNN_img{1,2}.ppm``, ``NNNNN_flow.flo``, ``FlyingChairs/FlyingChairs_train_val.txt`` | the split's samples (1 train, 2 val) | dense |
| ``viper`` | ``VIPER/<split>/flow/SSS/SSS_NNNNN.npz`` with ``img/SSS/SSS_NNNNN.jpg`` and ``SSS_{N+1}.jpg`` | frames with a flow file and both images | NaN / >512 invalid |
| ``synthetic_target`` | ``Cityscapes/flow_synthetic/<split>/CITY/CITY_SSSSSS_FFFFFF_flow.flo`` with frames F and F+1 | the synthetic target's frames (real Cityscapes has no flow) | NaN invalid |
| ``middlebury_stereo`` | none: ``skimage.data.stereo_motorcycle()`` (scikit-image) | left → right | (−disparity, 0), unknown invalid |
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sfc.data.base import check_size
from sfc.data.cityscapes import CS_FLOW_DIR
from sfc.data.flow_io import read_flo, read_viper_flow, resize_flow
from sfc.data.io import (
    DatasetError,
    flow_normalise,
    list_dirs,
    list_files,
    read_list_file,
    read_rgb,
    require_dir,
    resize_rgb,
)

FLOW_SETS = ("flying_chairs", "viper", "synthetic_target", "middlebury_stereo")
CHAIRS_DIR = "FlyingChairs"  # under the data root
CHAIRS_LIST = "FlyingChairs_train_val.txt"
# the size each set is evaluated at by default: the stage's (method §2), or the files' own
DEFAULT_SIZES = {"flying_chairs": None, "viper": (1280, 720), "synthetic_target": (1024, 512),
                 "middlebury_stereo": None}
DEFAULT_SPLITS = {"flying_chairs": "val", "viper": "train", "synthetic_target": "val",
                  "middlebury_stereo": "all"}


class FlowPairs(Dataset):
    """Base: ``self.pairs`` lists (image-1 path, image-2 path, flow path, name)."""

    set_name = "flow pairs"

    def __init__(self, size=None):
        self.size = check_size(size)
        self.pairs: list[tuple[Path, Path, Path, str]] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def read_flow(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    def _require_pairs(self, where) -> None:
        if not self.pairs:
            raise DatasetError(f"{self.set_name}: no image pairs with ground-truth flow found "
                               f"under {where}")

    def make_item(self, rgb1: np.ndarray, rgb2: np.ndarray, flow: np.ndarray, name: str,
                  where) -> dict:
        if rgb1.shape != rgb2.shape or flow.shape[:2] != rgb1.shape[:2]:
            raise DatasetError(f"{self.set_name} {where}: images {rgb1.shape[:2]} / "
                               f"{rgb2.shape[:2]} and flow {flow.shape[:2]} differ in size")
        if self.size is not None:
            rgb1, rgb2 = resize_rgb(rgb1, self.size), resize_rgb(rgb2, self.size)
            flow = resize_flow(flow, self.size)
        return {"img1": torch.from_numpy(flow_normalise(rgb1)),
                "img2": torch.from_numpy(flow_normalise(rgb2)),
                "flow_gt": torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1))),
                "name": name}

    def __getitem__(self, i: int) -> dict:
        p1, p2, pf, name = self.pairs[i]
        return self.make_item(read_rgb(p1), read_rgb(p2), self.read_flow(pf), name, pf)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} pairs, size={self.size})"


class FlyingChairs(FlowPairs):
    """Flying Chairs in its real layout under ``root`` (``FlyingChairs_release/data/`` and
    ``FlyingChairs_train_val.txt``, beside it or inside ``FlyingChairs_release/``)."""

    set_name = "Flying Chairs"

    def __init__(self, root, split: str = "train", size=None):
        super().__init__(size)
        if split not in ("train", "val"):
            raise ValueError(f"Flying Chairs split must be train or val, got {split!r}")
        root = Path(root)
        data = require_dir(root / "FlyingChairs_release" / "data", "Flying Chairs images")
        lists = [root / CHAIRS_LIST, root / "FlyingChairs_release" / CHAIRS_LIST]
        lst = next((p for p in lists if p.is_file()), None)
        if lst is None:
            raise DatasetError(f"Flying Chairs: split file {CHAIRS_LIST} not found (looked for "
                               f"{lists[0]} and {lists[1]}); it marks each sample 1 (train) or "
                               "2 (val)")
        marks = read_list_file(lst)
        flows = list_files(data, "_flow.flo")
        if len(marks) != len(flows):
            raise DatasetError(f"Flying Chairs: {lst} has {len(marks)} lines but {data} holds "
                               f"{len(flows)} *_flow.flo files; expected one line per sample")
        want = "1" if split == "train" else "2"
        for mark, fname in zip(marks, flows):
            if mark not in ("1", "2"):
                raise DatasetError(f"Flying Chairs: {lst} holds {mark!r}; expected 1 or 2 per "
                                   "line")
            if mark == want:
                n = fname[: -len("_flow.flo")]
                self.pairs.append((data / f"{n}_img1.ppm", data / f"{n}_img2.ppm",
                                   data / fname, n))
        self._require_pairs(f"{data} ({split})")

    def read_flow(self, path):
        return read_flo(path)


class ViperFlowPairs(FlowPairs):
    """VIPER frames with a flow file: frame N → N+1 (``VIPER/<split>/flow/SSS/SSS_NNNNN.npz``)."""

    set_name = "VIPER flow"

    def __init__(self, root, split: str = "train", size=None):
        super().__init__(size)
        root = Path(root)
        flow_dir = require_dir(root / split / "flow", f"VIPER ground-truth flow ({split})")
        img_dir = root / split / "img"
        for seq in list_dirs(flow_dir):
            for fname in list_files(flow_dir / seq, ".npz"):
                m = re.fullmatch(r"(\d+)_(\d+)\.npz", fname)
                if not m:
                    continue
                f = int(m.group(2))
                p1 = img_dir / seq / f"{seq}_{f:05d}.jpg"
                p2 = img_dir / seq / f"{seq}_{f + 1:05d}.jpg"
                if p1.is_file() and p2.is_file():
                    self.pairs.append((p1, p2, flow_dir / seq / fname, f"{seq}_{f:05d}"))
        self._require_pairs(flow_dir)

    def read_flow(self, path):
        return read_viper_flow(path)


class SyntheticTargetFlowPairs(FlowPairs):
    """The synthetic target's frames F → F+1 with ``Cityscapes/flow_synthetic/`` ground truth."""

    set_name = "synthetic target flow"

    def __init__(self, root, split: str = "val", size=None):
        super().__init__(size)
        root = Path(root)
        flow_dir = require_dir(root / CS_FLOW_DIR / split,
                               f"synthetic target flow ({split}; written by "
                               "python -m sfc.data.synthetic, real Cityscapes has none)")
        img_dir = root / "leftImg8bit_sequence" / split
        for city in list_dirs(flow_dir):
            for fname in list_files(flow_dir / city, "_flow.flo"):
                m = re.fullmatch(r"([A-Za-z]+)_(\d{6})_(\d{6})_flow\.flo", fname)
                if not m:
                    continue
                seq, f = m.group(2), int(m.group(3))
                p1 = img_dir / city / f"{city}_{seq}_{f:06d}_leftImg8bit.png"
                p2 = img_dir / city / f"{city}_{seq}_{f + 1:06d}_leftImg8bit.png"
                if p1.is_file() and p2.is_file():
                    self.pairs.append((p1, p2, flow_dir / city / fname, f"{city}_{seq}_{f:06d}"))
        self._require_pairs(flow_dir)

    def read_flow(self, path):
        return read_flo(path)


class MiddleburyStereo(FlowPairs):
    """Middlebury 2014 "motorcycle" (scikit-image's ``stereo_motorcycle``): real photographs,
    left → right, flow (−disparity, 0); unknown disparity invalid. Needs scikit-image."""

    set_name = "Middlebury stereo (motorcycle)"

    def __init__(self, size=None):
        super().__init__(size)
        try:
            from skimage.data import stereo_motorcycle
        except ImportError:
            raise DatasetError("--flow-set middlebury_stereo needs scikit-image (pip install "
                               "scikit-image, or pip install -e '.[flow]')") from None
        left, right, disp = stereo_motorcycle()
        flow = np.stack([-disp, np.zeros_like(disp)], axis=2).astype(np.float32)
        flow[~np.isfinite(disp)] = np.nan
        self._item = (np.ascontiguousarray(left[..., :3]), np.ascontiguousarray(right[..., :3]),
                      flow)
        self.pairs = [(Path("left"), Path("right"), Path("disparity"), "motorcycle")]

    def __getitem__(self, i: int) -> dict:
        if i != 0:
            raise IndexError(i)
        return self.make_item(*self._item, "motorcycle", "motorcycle")


def make_flow_set(name: str, data_root, split: str | None = None, size=None) -> FlowPairs:
    """The flow set ``name`` (``FLOW_SETS``) under ``data_root``; ``split`` None: the set's
    default (``DEFAULT_SPLITS``)."""
    split = split or DEFAULT_SPLITS.get(name)
    root = Path(data_root)
    if name == "flying_chairs":
        return FlyingChairs(root / CHAIRS_DIR, split, size)
    if name == "viper":
        return ViperFlowPairs(root / "VIPER", split, size)
    if name == "synthetic_target":
        return SyntheticTargetFlowPairs(root / "Cityscapes", split, size)
    if name == "middlebury_stereo":
        return MiddleburyStereo(size)
    raise ValueError(f"unknown flow set {name!r}; expected one of {FLOW_SETS}")
