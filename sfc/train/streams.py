"""Endless, resumable training streams over a dataset (the release's "restart the loader with a
new order each epoch").

Each epoch's order is `DistributedSampler(shuffle=True, seed=seed)` with `set_epoch(epoch)` —
the same permutation on every rank, each rank taking its shard; with one process it is a seeded
permutation. The state `(epoch, batches consumed)` is saved in `last.pt`, so a resumed run
continues with exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from sfc.data.io import normalise_batch


class _ListSampler(Sampler):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TrainStream:
    """`next(stream)` → a batch; loops over epochs forever.

    `seed` fixes the per-epoch permutations (use different seeds for source and target so the
    two orders are independent).
    """

    def __init__(self, dataset, batch_size: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        if len(dataset) == 0:
            raise ValueError(f"training dataset {type(dataset).__name__} is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch already returned
        self._it = None

    def _indices(self, epoch: int) -> list[int]:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=False)
        sampler.set_epoch(epoch)
        return list(sampler)

    def _start(self) -> None:
        idx = self._indices(self.epoch)[self.consumed * self.batch_size:]
        loader = DataLoader(self.dataset, batch_size=self.batch_size,
                            sampler=_ListSampler(idx), num_workers=self.num_workers,
                            pin_memory=self.pin_memory, drop_last=False,
                            persistent_workers=False)
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.consumed = 0
            self._start()
            batch = next(self._it)
        self.consumed += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"data-order seed mismatch on resume: checkpoint {state.get('seed')}"
                             f", run {self.seed}")
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._it = None


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch's tensors to `device`; a raw "bgr" clip (datasets built with `raw=True`, as
    training does) becomes "seg" and "flow" there, bit-identical to the float path."""
    moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
             for k, v in batch.items()}
    return normalise_batch(moved)
