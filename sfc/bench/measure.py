"""Timing, memory and FLOP measurement, and the full-pipeline extrapolation (method §5).

Units: seconds, bytes (reported as GiB), FLOP (one multiply-add = 2 FLOP, as
`torch.utils.flop_counter` counts them).
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sfc.train import graphed

GIB = 2 ** 30

# The release's pipeline (method §5): (run, bench kind, iterations, eval every, val images).
# Validation: Cityscapes val (500 clips) every 2,000 iterations; SFM: VIPER val every 4,000
# (the release's list has 460 entries). The last evaluation falls on the last iteration.
PIPELINE = (
    ("FlowNet_pretrain/stage_one update", "segnet", 80_000, 2000, 500),
    ("FlowNet_pretrain/stage_one reference", "segnet", 80_000, 2000, 500),
    ("FlowNet_pretrain/stage_two", "accel", 80_000, 2000, 500),
    ("SFM", "sfm", 80_000, 4000, 460),
    ("SFC/stage_one update", "segnet_sfc", 120_000, 2000, 500),
    ("SFC/stage_one reference", "segnet_sfc", 120_000, 2000, 500),
    ("SFC/stage_two", "accel_sfc", 160_000, 2000, 500),
)
# the kinds whose runs come in pairs (update, reference): independent, so they can run at once
PAIRED_KINDS = tuple(k for k in dict.fromkeys(r[1] for r in PIPELINE)
                     if sum(r[1] == k for r in PIPELINE) == 2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RSSPeak:
    """Peak resident set size of this process while the block runs, sampled every `period` s
    from /proc/self/statm (Linux); `peak` in bytes, 0 where unavailable."""

    def __init__(self, period: float = 0.005):
        self.period, self.peak = period, 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.period)

    def __enter__(self):
        self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def max_rss_bytes() -> int:
    """Peak RSS of the whole process so far (`getrusage`, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_flops(fn) -> int:
    """FLOP of one call of `fn` (forward + backward of a training step), counted once."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def mps_running() -> bool:
    """Whether this process's CUDA work would go through NVIDIA's MPS (its control daemon's
    pipe directory exists: `CUDA_MPS_PIPE_DIRECTORY`, or the default one): with it, processes
    side by side share one context and their kernels can overlap; without it the device
    time-slices between them."""
    pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or Path(tempfile.gettempdir(),
                                                                 "nvidia-mps")
    return Path(pipes).is_dir()


def time_calls(fn, iters: int, warmup: int, device: torch.device) -> list[float]:
    """Wall time (s) of each of `iters` calls after `warmup` untimed ones, synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def memory_block(device: torch.device):
    """Context manager + reader of the peak memory of the block: CUDA allocator peak, or the
    sampled process RSS peak on CPU."""
    if device.type == "cuda":
        class _Cuda:
            def __enter__(self):
                torch.cuda.reset_peak_memory_stats(device)
                return self

            def __exit__(self, *exc):
                self.peak = torch.cuda.max_memory_allocated(device)
        return _Cuda()
    return RSSPeak()


def pipeline_estimate(step_s: dict[str, float], eval_s: dict[str, float]) -> dict:
    """Full-pipeline wall time from per-kind step times (s/iteration) and per-image evaluation
    times (s/image). Kinds that were not measured make the total None."""
    runs, total, complete = [], 0.0, True
    for name, kind, iters, every, n_val in PIPELINE:
        s, e = step_s.get(kind), eval_s.get(kind)
        n_evals = -(-iters // every)
        train_h = s * iters / 3600 if s is not None else None
        eval_h = e * n_evals * n_val / 3600 if e is not None else None
        runs.append({"run": name, "kind": kind, "iters": iters, "evals": n_evals,
                     "val_images": n_val, "train_h": train_h, "eval_h": eval_h})
        if train_h is None:
            complete = False
        else:
            total += train_h + (eval_h or 0.0)
    return {"runs": runs, "total_h": total if complete else None,
            "total_train_h": (sum(r["train_h"] for r in runs) if complete else None)}


# aten ops that make the host wait for the GPU, as the profiler names them (sfc.train.graphed)
SYNC_OPS = tuple(f"aten::{n}" for n in graphed.SYNC_OPS)
# CUDA runtime calls that block the host, as the profiler names them
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaGraphLaunch")


# GPU time by kernel kind (profiler kernel names; first match wins)
KERNEL_KINDS = (
    ("copy", ("memcpy", "memset")),
    ("batchnorm", ("bn_fw", "bn_bw", "batch_norm", "batchnorm")),
    ("layout", ("nchwtonhwc", "nhwctonchw")),
    ("conv", ("fprop", "dgrad", "wgrad", "conv", "winograd")),
    ("gemm", ("gemm", "cutlass", "cublas")),
    ("grid_sample", ("grid_sampler",)),
    ("fused", ("triton_",)),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel from its name (KERNEL_KINDS), else "other"."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_counts(fn, device: torch.device) -> dict:
    """Counts of one call of `fn` under `torch.profiler`: aten ops, host-sync ops (SYNC_OPS, by
    name), and on CUDA the kernels run on the GPU, the launch calls and the blocking runtime
    calls (SYNC_CALLS; `cudaMemcpy` without Async only), less those of profiling an empty call
    (the measurement's own synchronize). On CUDA also the wall time of the profiled call, the
    sum of its kernels' times and that sum by kernel kind (`kernel_kind`), in ms: how much of
    the iteration the GPU computes, and what. On the CPU the CUDA entries are None."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        acts.append(ProfilerActivity.CUDA)
    wall = {}

    def run(f):
        sync(torch.device(device))
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            f()
            sync(torch.device(device))
            wall["s"] = time.perf_counter() - t0
        return prof.events()

    base = run(lambda: None)  # what the measurement itself adds (its final synchronize, ...)
    ev = run(fn)
    names = [e.name for e in ev]
    out = {"aten_ops": sum(n.startswith("aten::") for n in names),
           "sync_ops": sum(n in SYNC_OPS for n in names),
           "sync_op_names": sorted({n for n in names if n in SYNC_OPS}),
           "kernels": None, "launches": None, "host_syncs": None, "wall_ms": None,
           "gpu_ms": None, "gpu_ms_by_kind": None}
    if cuda:
        dev_ev = [e for e in ev if str(getattr(e, "device_type", "")).endswith("CUDA")]
        out["kernels"] = sum(1 for e in dev_ev if "memcpy" not in e.name.lower()
                             and "memset" not in e.name.lower())
        out["launches"] = sum(n in LAUNCH_CALLS for n in names)
        base_syncs = sum(e.name in SYNC_CALLS for e in base)
        out["host_syncs"] = max(0, sum(n in SYNC_CALLS for n in names) - base_syncs)
        by_kind: dict[str, float] = {}
        for e in dev_ev:
            k = kernel_kind(e.name)
            by_kind[k] = by_kind.get(k, 0.0) + e.time_range.elapsed_us() / 1e3
        out["wall_ms"] = wall["s"] * 1e3  # profiled: a little slower than the timed iterations
        out["gpu_ms"] = sum(by_kind.values())
        out["gpu_ms_by_kind"] = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
    return out
