"""Measuring one stage kind, and the release-style reference next to the project's step."""

from __future__ import annotations

import gc
import math
import time

import torch
from torch.utils.data import DataLoader

from sfc.bench import measure, steps

REF_RTOL = 1e-4  # loss equality of project vs release-style reference, float32


def measure_stage(kind: str, bc: steps.BenchConfig, iters: int, warmup: int,
                  eval_images: int = 2, flops: bool = True, ckpt_dir=None, log=print,
                  profile: bool = False) -> dict:
    """Median training-iteration time, peak memory, FLOP/step and TFLOP/s, and the per-image
    validation time of one stage kind; with `profile` the profiler's counts of one iteration
    (kernels, launches, host syncs: `measure.profile_counts`)."""
    dev = torch.device(bc.device)
    stage = steps.build(kind, bc, ckpt_dir=ckpt_dir)
    src, tgt = steps.make_batches(kind, bc, seed=bc.seed)
    runner = steps.graph_runner(kind, stage, bc)  # --cuda-graph: None for eager
    state = {"i": 0, "terms": {}, "phases": None}

    def step():
        state["terms"] = steps.train_iteration(stage, src, tgt, state["i"], state["phases"],
                                               runner=runner)
        state["i"] += 1

    n_flops = measure.count_flops(step) if flops else None  # also serves as a warm-up step
    # the warm-up outside the memory block: cuDNN's algorithm search (--cudnn-benchmark) tries
    # workspaces up to the free memory in the first steps (137 GiB seen on an H200); a graph
    # runner's eager warm-up and capture too
    measure.time_calls(step, 0, max(warmup, runner.calls_to_capture if runner else 0), dev)
    with measure.memory_block(dev) as mem:
        times = measure.time_calls(step, iters, 0, dev)
    s = measure.median(times)
    opt_s = None
    if runner is None:
        state["phases"] = {}  # the optimiser step's share, timed apart (not in step_s)
        measure.time_calls(step, min(iters, 2), 0, dev)
        opt_s = measure.median(state["phases"]["opt_s"])
        state["phases"] = None
    counts = measure.profile_counts(step, dev) if profile else None
    eval_s = measure_eval(stage, kind, bc, eval_images) if eval_images > 0 else None
    rec = {"kind": kind, "precision": bc.precision, "channels_last": bc.channels_last,
           "source_size": list(bc.source_size), "target_size": list(bc.target_size),
           "foreach_sgd": bc.foreach_sgd, "source_prev_forward": bc.source_prev_forward,
           "compile": bc.compile, "check_every": stage.guard.every,
           "cuda_graph": (False if runner is None else
                          True if dev.type == "cuda" else "emulated"),
           "step_s": s, "step_times_s": times, "opt_s": opt_s,
           "flops_per_step": n_flops,
           "tflops_per_s": (n_flops / s / 1e12 if n_flops and s > 0 else None),
           "peak_mem_bytes": int(mem.peak),
           "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "rss_sampled",
           "eval_s_per_image": eval_s, "counts": counts,
           "loss_terms": {k: float(v) for k, v in state["terms"].items()}}
    return rec


def release_memory(device: str) -> None:
    """Free the previous stage's networks before building the next one."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure_eval(stage, kind: str, bc: steps.BenchConfig, n: int) -> float:
    """Seconds per validation image of `stage.validate` (the engine's validation), after one
    warm-up image."""
    items = steps.make_val_items(kind, bc, n + 1)
    dev = torch.device(bc.device)
    stage.validate(DataLoader(items[:1], batch_size=1), progress=False)
    measure.sync(dev)
    times = measure.time_calls(
        lambda: stage.validate(DataLoader(items[1:], batch_size=1), progress=False), 1, 0, dev)
    return times[0] / n


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def measure_reference(kind: str, bc: steps.BenchConfig, iters: int, warmup: int,
                      ckpt_dir=None, log=print) -> dict:
    """Release-style reference vs the project's step, in lockstep on the same batch: before each
    iteration the reference copies the project's network and optimiser state (untimed), so
    every iteration compares loss terms from identical states (rtol 1e-4) — without the copy,
    rounding differences grow chaotically within a few steps at batch 1 and random init.
    Per-iteration times of both; the order alternates each iteration, so load from other
    processes hits both alike."""
    from sfc.bench.reference import REFERENCES

    if kind not in REFERENCES:
        raise ValueError(f"no release-style reference for {kind!r}; have {sorted(REFERENCES)}")
    dev = torch.device(bc.device)
    stage = steps.build(kind, bc, ckpt_dir=ckpt_dir)
    ref = REFERENCES[kind](stage)  # deep copies taken before any step
    src, tgt = steps.make_batches(kind, bc, seed=bc.seed)
    t_proj, t_ref, m_proj, m_ref, diffs, first = [], [], [], [], [], None
    def one(who: str, i: int) -> tuple[dict, float, int | None]:
        """(loss terms, seconds, CUDA peak bytes above what was allocated before the step)."""
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        with measure.memory_block(dev) as mem:
            measure.sync(dev)
            t0 = time.perf_counter()
            terms = (ref.step(src, tgt, i) if who == "ref"
                     else steps.train_iteration(stage, src, tgt, i))
            terms = {k: float(v) for k, v in terms.items()}  # deferred checks: device tensors
            measure.sync(dev)
            t = time.perf_counter() - t0
        return terms, t, (mem.peak - base if dev.type == "cuda" else None)

    for i in range(warmup + iters):
        ref.sync_from(stage)
        out = {}
        order = ("ref", "proj") if i % 2 == 0 else ("proj", "ref")
        for who in order:
            out[who], t, extra = one(who, i)
            if i >= warmup:
                (t_ref if who == "ref" else t_proj).append(t)
                (m_ref if who == "ref" else m_proj).append(extra)
        d = max(_rel(out["ref"][k], out["proj"][k]) for k in out["proj"])
        diffs.append(d)
        if first is None:
            first = {"project": out["proj"], "reference": out["ref"]}
        log(f"  reference {kind} iter {i}: project {out['proj']} reference {out['ref']} "
            f"(max rel diff {d:.2e})")
    equal = all(math.isfinite(d) and d <= REF_RTOL for d in diffs)
    sp, sr = measure.median(t_proj), measure.median(t_ref)
    return {"kind": kind, "precision": bc.precision, "source_size": list(bc.source_size),
            "source_prev_forward": bc.source_prev_forward, "threads": torch.get_num_threads(),
            "target_size": list(bc.target_size), "project_step_s": sp, "reference_step_s": sr,
            "project_times_s": t_proj, "reference_times_s": t_ref,
            "speedup": sr / sp if sp > 0 else None,
            # median over iterations of (reference / project) of the same iteration: robust to
            # load from other processes that changes between iterations
            "speedup_paired": measure.median([r / p for r, p in zip(t_ref, t_proj)]),
            "project_step_extra_mem_bytes": (max(m_proj) if dev.type == "cuda" else None),
            "reference_step_extra_mem_bytes": (max(m_ref) if dev.type == "cuda" else None),
            "max_rel_loss_diff": max(diffs), "losses_equal": equal, "rtol": REF_RTOL,
            "first_losses": first}
