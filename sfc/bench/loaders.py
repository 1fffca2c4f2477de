"""Data-loader throughput at the faithful sizes, reading synthetic trees written at the datasets'
NATIVE sizes (VIPER 1920×1080 JPEG, Cityscapes 2048×1024 PNG), so decoding and resizing cost
what they cost on the real files (files come from the page cache: disk speed is not measured).

For each loader a stage uses: samples/s of ONE `DataLoader` worker (batch 1, as training), and
how many workers keep up with one sample per training iteration of the measured step time:
`workers = ⌈(1 / step_s) / samples_per_s_one_worker⌉` (workers scale linearly while cores last).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

# loader name → (dataset, constructor kwargs): the training loaders of method §5 at their sizes,
# as `sfc.train` builds them (raw uint8 clips, normalised on the device after the copy), and
# for comparison VIPER with the float32 normalisation in the worker (the datasets' default).
LOADERS = {
    "viper_f2": ("viper", {"split": "train", "frames": 2, "size": (1280, 720), "raw": True}),
    "viper_prev_label": ("viper", {"split": "train", "frames": 2, "size": (1280, 720),
                                   "prev_label": True, "raw": True}),
    "cityscapes_f2": ("cityscapes", {"split": "train", "frames": 2, "size": (1024, 512),
                                     "raw": True}),
    "cityscapes_f3": ("cityscapes", {"split": "train", "frames": 3, "size": (1024, 512),
                                     "raw": True}),
    "viper_f2_float": ("viper", {"split": "train", "frames": 2, "size": (1280, 720)}),
}
# bench kind → the loaders it draws one sample from per iteration (source, then target)
STAGE_LOADERS = {"segnet": ("viper_f2",), "segnet_sfc": ("viper_f2", "cityscapes_f2"),
                 "accel": ("viper_f2",), "accel_sfc": ("viper_f2", "cityscapes_f3"),
                 "sfm": ("viper_prev_label",)}


def write_native_tree(out_dir: Path) -> Path:
    """A small synthetic VIPER + Cityscapes tree at native sizes under `out_dir`: 2 VIPER train
    sequences of frames 9 and 10 (one annotated clip each, both frames labelled), 2 Cityscapes
    train snippets of frames 17–19."""
    from sfc.data.synthetic import generate

    generate(out_dir, seed=0, datasets=("viper", "cityscapes"), native=True, viper_seqs=2,
             viper_val_seqs=0, frames_per_seq=2, viper_first_frame=9, cs_train=2, cs_val=0,
             cs_context=2)
    return Path(out_dir)


def one_worker_rate(dataset, samples: int, warmup: int = 2, workers: int = 1,
                    pin_memory: bool = False) -> float:
    """Samples/s of a `DataLoader` with `workers` worker processes (batch 1), after `warmup`
    batches (worker start-up excluded). Indices cycle over the dataset."""
    idx = [i % len(dataset) for i in range(warmup + samples)]
    loader = DataLoader(dataset, batch_size=1, sampler=idx, num_workers=workers,
                        pin_memory=pin_memory, prefetch_factor=2 if workers else None)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
    return n / (time.perf_counter() - t0)


def measure_loaders(samples: int, step_s: dict[str, float], device: str = "cpu",
                    data_root: Path | None = None, workers_check: int = 0, log=print) -> dict:
    """Throughput of each loader and the workers each measured stage needs.

    `step_s`: bench kind → median step time (s) of the stages measured in this run (may be
    empty). `workers_check > 0` also measures each loader with that many workers (scaling)."""
    from sfc.data import make_dataset

    pin = device.startswith("cuda") and torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="sfc-bench-data-") as tmp:
        root = Path(data_root) if data_root is not None else Path(tmp)
        if data_root is None:
            t0 = time.perf_counter()
            write_native_tree(root)
            log(f"native synthetic tree written in {time.perf_counter() - t0:.1f} s")
        rates, multi = {}, {}
        for name, (ds_name, kw) in LOADERS.items():
            ds = make_dataset(ds_name, root, **kw)
            rates[name] = one_worker_rate(ds, samples, pin_memory=pin)
            log(f"loader {name}: {rates[name]:.2f} samples/s (1 worker)")
            if workers_check > 0:
                multi[name] = one_worker_rate(ds, samples * workers_check,
                                              workers=workers_check, pin_memory=pin)
                log(f"loader {name}: {multi[name]:.2f} samples/s ({workers_check} workers)")
    need = {}
    for kind, s in step_s.items():
        if s is None or not math.isfinite(s) or s <= 0:
            continue
        need[kind] = {name: math.ceil((1.0 / s) / rates[name]) for name in STAGE_LOADERS[kind]}
    return {"samples_per_s_one_worker": rates,
            "samples_per_s_multi": ({"workers": workers_check, **multi} if multi else None),
            "sizes": {n: list(kw["size"]) for n, (_, kw) in LOADERS.items()},
            "stage_loaders": {k: list(v) for k, v in STAGE_LOADERS.items()},
            "workers_needed": need, "pin_memory": pin}
