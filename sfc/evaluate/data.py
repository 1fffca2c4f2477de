"""Evaluation data: native-resolution labels (the ``full`` protocol) and the sharded loader."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from sfc.data.classes import CITYSCAPES_NUM_IDS
from sfc.data.io import check_ids, read_index_label
from sfc.dist import ShardSampler


class NativeLabels(Dataset):
    """Adds ``"label_full"`` (``H0×W0`` int64 train ids, -1 ignore) to each item of a
    :class:`sfc.data.CityscapesSeq`: its gtFine ``labelIds`` file at the file's own size
    (2048×1024 for real Cityscapes), mapped with the dataset's LUT — no resizing.

    Uses the dataset's ``items`` / ``label_path(city, seq, f)`` / ``lut`` (sfc.data.cityscapes).
    """

    def __init__(self, dataset):
        missing = [a for a in ("items", "label_path", "lut") if not hasattr(dataset, a)]
        if missing:
            raise TypeError(f"the 'full' protocol reads native Cityscapes labels and needs a "
                            f"CityscapesSeq-like dataset; {type(dataset).__name__} lacks {missing}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def native_label(self, i: int) -> torch.Tensor:
        path = self.dataset.label_path(*self.dataset.items[i])
        ids = read_index_label(path, "Cityscapes labelIds")  # (H0, W0) uint8 labelIds
        check_ids(ids, CITYSCAPES_NUM_IDS, path, "Cityscapes labelIds")
        return torch.from_numpy(self.dataset.lut[ids])  # (H0, W0) int64 train ids

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        item["label_full"] = self.native_label(i)
        return item


def make_eval_loader(dataset, batch_size: int = 1, num_workers: int = 2,
                     pin_memory: bool = False) -> DataLoader:
    """A loader over this process's shard (``ShardSampler``: every image exactly once over all
    ranks, no padding), in dataset order. In a single process the shard is the whole set."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(dataset),
                      shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
                      drop_last=False, persistent_workers=False)
