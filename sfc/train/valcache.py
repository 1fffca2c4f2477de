"""The validation set kept in memory after its first complete pass (`--val-cache-gb`).

A run evaluates the same validation set every `--eval-every` iterations: 40 to 80 times per
run of the pipeline, 500 Cityscapes clips each, every one decoded from 2048×1024 PNGs and
resized again. With the cache, the first evaluation reads the files as before and keeps what
the loader gave (compactly: the raw uint8 clip, labels in one byte where their values fit); later
evaluations take the batches from memory. What the evaluation computes does not change: the
batches are the same tensors (the raw clip is normalised on the device, bit-identical to the
float path, `sfc.train.streams.to_device`), in the same order (the validation sampler does not
shuffle).

Only a complete pass is kept: an evaluation cut short (a data error, a stop) keeps nothing and
the next one reads the files again. If the kept batches would pass the limit, the cache is
given up for the run (one log line) and every evaluation reads the files, as without it.
"""

from __future__ import annotations

import torch

from sfc.train.streams import to_device

GIB = 1024**3


def _small(v: torch.Tensor):
    """The one-byte dtype that holds every value of integer tensor `v`, or None."""
    if v.dtype not in (torch.int64, torch.int32, torch.int16) or not v.numel():
        return None
    lo, hi = int(v.min()), int(v.max())
    if -128 <= lo and hi <= 127:
        return torch.int8  # train ids with the ignore id -1
    if 0 <= lo and hi <= 255:
        return torch.uint8
    return None


def _compact(batch: dict) -> dict:
    """The batch as kept: tensors as they are, except integer tensors whose values fit in one
    byte (labels), kept so with their dtype to restore."""
    out = {}
    for k, v in batch.items():
        small = _small(v) if torch.is_tensor(v) else None
        out[k] = (v.to(small), v.dtype) if small is not None else v
    return out


def _nbytes(kept: dict) -> int:
    n = 0
    for v in kept.values():
        t = v[0] if isinstance(v, tuple) else v
        if torch.is_tensor(t):
            n += t.numel() * t.element_size()
    return n


def _expand(kept: dict, device: torch.device) -> dict:
    """The kept batch on `device`, as the loader gave it (dtypes restored on the device)."""
    moved = {k: (v[0].to(device, non_blocking=True) if isinstance(v, tuple) else v)
             for k, v in kept.items()}
    out = to_device(moved, device)
    for k, v in kept.items():
        if isinstance(v, tuple):
            out[k] = out[k].to(v[1])
    return out


class CachedLoader:
    """Iterates `loader`'s batches on `device` (`to_device`), reading the files on the first
    complete pass only while the kept batches stay within `limit_gb` (0: never kept). Has the
    loader's length, `dataset` and `batch_size`."""

    def __init__(self, loader, device, limit_gb: float, log=print):
        self.loader = loader
        self.dataset = loader.dataset
        self.batch_size = getattr(loader, "batch_size", None) or getattr(
            getattr(loader, "loader", None), "batch_size", None)
        self.device = torch.device(device)
        self.limit = float(limit_gb) * GIB
        self.log = log
        self.items: list[dict] | None = None  # after a complete pass within the limit
        self.given_up = limit_gb <= 0

    def __len__(self):
        return len(self.loader)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(b) for b in self.items or ())

    def __iter__(self):
        if self.items is not None:
            for kept in self.items:
                yield _expand(kept, self.device)
            return
        kept, size = (None if self.given_up else []), 0
        for batch in self.loader:
            if kept is not None:
                c = _compact(batch)
                size += _nbytes(c)
                if size > self.limit:
                    kept, self.given_up = None, True
                    self.log(f"validation cache: given up (the validation batches pass "
                             f"--val-cache-gb {self.limit / GIB:g}); every evaluation reads "
                             "the files")
                else:
                    kept.append(c)
            yield to_device(batch, self.device)
        if kept is not None:  # a complete pass: later evaluations read memory
            self.items = kept
            amount = f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"
            self.log(f"validation cache: {len(kept)} batch{'es' if len(kept) != 1 else ''}, "
                     f"{amount} in memory; later "
                     "evaluations read no files")


__all__ = ["CachedLoader"]
