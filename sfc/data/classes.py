"""Class names, Cityscapes colours, evaluation protocols and label lookup tables (method §2).

Every label map of the project is a NumPy lookup table (LUT) of length 256 indexed by the
dataset's own class id (uint8) and holding the train id (int64, ``IGNORE`` = -1 elsewhere):
``train = LUT[ids]`` maps a whole label in one indexing operation.

Provenance: the maps are method §2.2 (VIPER), §2.3 (Cityscapes, 15 and 12 classes) and §2.4
(SYNTHIA-Seq, the DA-VSN/TPS protocol, including its bicycle→"rider" quirk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -1  # train id of unlabelled / unmapped pixels (the losses' ignore index)

# Cityscapes colours (cityscapesScripts `labels.py`), RGB, by class name.
CITYSCAPES_COLOURS = {
    "road": (128, 64, 128), "sidewalk": (244, 35, 232), "building": (70, 70, 70),
    "wall": (102, 102, 156), "fence": (190, 153, 153), "pole": (153, 153, 153),
    "traffic light": (250, 170, 30), "traffic sign": (220, 220, 0),
    "vegetation": (107, 142, 35), "terrain": (152, 251, 152), "sky": (70, 130, 180),
    "person": (220, 20, 60), "rider": (255, 0, 0), "car": (0, 0, 142), "truck": (0, 0, 70),
    "bus": (0, 60, 100), "train": (0, 80, 100), "motorcycle": (0, 0, 230),
    "bicycle": (119, 11, 32),
}

CLASSES_15 = [
    "road", "sidewalk", "building", "fence", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "car", "truck", "bus", "motorcycle", "bicycle",
]
CLASSES_12 = [
    "road", "sidewalk", "building", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "sky", "person", "rider", "car",
]

# --- dataset id -> train id (method §2) ------------------------------------------------------
VIPER_TO_15 = {3: 0, 4: 1, 9: 2, 11: 3, 13: 4, 14: 5, 7: 6, 8: 6, 6: 7, 2: 8, 20: 9, 24: 10,
               27: 11, 26: 12, 23: 13, 22: 14}
CITYSCAPES_TO_15 = {7: 0, 8: 1, 11: 2, 13: 3, 19: 4, 20: 5, 21: 6, 22: 7, 23: 8, 24: 9,
                    25: 9,  # rider -> person (VIPER has no rider class)
                    26: 10, 27: 11, 28: 12, 32: 13, 33: 14}
CITYSCAPES_TO_12 = {7: 0, 8: 1, 11: 2, 13: 3, 17: 4, 19: 5, 20: 6, 21: 7, 23: 8, 24: 9,
                    25: 10, 26: 11}
SYNTHIA_TO_12 = {3: 0, 4: 1, 2: 2, 5: 3, 7: 4, 15: 5, 9: 6, 6: 7, 1: 8, 10: 9,
                 11: 10,  # bicycle -> "rider": DA-VSN's quirk, the benchmark depends on it
                 8: 11}

# Ids a well-formed label may contain (anything else is reported as a broken file).
VIPER_NUM_IDS = 32       # 0 unlabelled ... 31 boat
CITYSCAPES_NUM_IDS = 34  # labelIds 0 unlabelled ... 33 bicycle (-1 licence plate is not stored)
SYNTHIA_NUM_IDS = 23     # 0 void ... 22; SEQS uses 0-15, later SYNTHIA releases up to 22

VIPER_CAR_ID = 24  # the id whose bottom-centre component is the ego vehicle (method §2.2)


def build_lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """(size,) int64 table: ``lut[dataset_id] = train_id``, ``IGNORE`` for unmapped ids."""
    lut = np.full(size, IGNORE, dtype=np.int64)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


VIPER_LUT_15 = build_lut(VIPER_TO_15)
CITYSCAPES_LUT_15 = build_lut(CITYSCAPES_TO_15)
CITYSCAPES_LUT_12 = build_lut(CITYSCAPES_TO_12)
SYNTHIA_LUT_12 = build_lut(SYNTHIA_TO_12)


@dataclass(frozen=True)
class Protocol:
    """One benchmark's class set: what is trained and what is averaged in the mIoU."""

    name: str               # "viper15" (VIPER→Cityscapes) or "synthia12" (SYNTHIA-Seq→Cityscapes)
    num_classes: int        # C, number of train ids (logit channels)
    class_names: list[str]  # train id -> name
    eval_ids: list[int]     # train ids averaged in the mIoU
    palette: np.ndarray     # (C, 3) uint8, Cityscapes RGB colour of each train id

    @property
    def eval_names(self) -> list[str]:
        return [self.class_names[i] for i in self.eval_ids]


def _palette(names: list[str]) -> np.ndarray:
    return np.array([CITYSCAPES_COLOURS[n] for n in names], dtype=np.uint8)


PROTOCOLS = {
    15: Protocol("viper15", 15, list(CLASSES_15), list(range(15)), _palette(CLASSES_15)),
    # 12 classes trained, fence (train id 3) dropped from the mean: DA-VSN's 11-class protocol.
    12: Protocol("synthia12", 12, list(CLASSES_12), [i for i in range(12) if i != 3],
                 _palette(CLASSES_12)),
}


def get_protocol(num_classes: int) -> Protocol:
    """The 15-class (VIPER) or 12-class (SYNTHIA-Seq, 11 evaluated) protocol."""
    if num_classes not in PROTOCOLS:
        raise ValueError(f"no class protocol with {num_classes} classes; expected 15 "
                         "(VIPER→Cityscapes) or 12 (SYNTHIA-Seq→Cityscapes)")
    return PROTOCOLS[num_classes]


def labelids_of_train_ids(num_classes: int) -> np.ndarray:
    """(C,) uint8: the Cityscapes labelId written for each train id of the protocol (the
    smallest labelId that maps to it: rider, merged into person by the 15-class map, is written
    as person, 24). Predictions saved this way are read back by `CITYSCAPES_LUT_*` unchanged
    and work with `cityscapesscripts` and the evaluation server."""
    mapping = {15: CITYSCAPES_TO_15, 12: CITYSCAPES_TO_12}[get_protocol(num_classes).num_classes]
    out = np.zeros(num_classes, dtype=np.uint8)
    for label_id, train_id in sorted(mapping.items(), reverse=True):
        out[train_id] = label_id
    return out
