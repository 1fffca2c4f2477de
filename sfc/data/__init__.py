"""Datasets read from their real on-disk layouts (method §2), and a synthetic generator.

``make_dataset("viper", data_root, split="train", size=...)`` builds a dataset from the data
root (``SFC_DATA``, default ``data/``), whose sub-folders are ``DATASET_DIRS``.
"""

from __future__ import annotations

from pathlib import Path

from sfc.data.cityscapes import CityscapesSeq
from sfc.data.classes import IGNORE, Protocol, get_protocol
from sfc.data.io import DatasetError
from sfc.data.synthia import SynthiaSeq
from sfc.data.viper import ViperSeq

DATASET_DIRS = {
    "viper": "VIPER",
    "cityscapes": "Cityscapes",
    "synthia_seq": "SynthiaSeq/SEQS-04-DAWN",
}
DATASET_CLASSES = {"viper": ViperSeq, "cityscapes": CityscapesSeq, "synthia_seq": SynthiaSeq}


def make_dataset(name: str, data_root, **kwargs):
    """The dataset ``name`` (viper / cityscapes / synthia_seq) under ``data_root``; the keyword
    arguments go to its constructor."""
    if name not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_CLASSES)}")
    return DATASET_CLASSES[name](Path(data_root) / DATASET_DIRS[name], **kwargs)


__all__ = ["CityscapesSeq", "DATASET_DIRS", "DatasetError", "IGNORE", "Protocol", "SynthiaSeq",
           "ViperSeq", "get_protocol", "make_dataset"]
