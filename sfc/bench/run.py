"""Measuring one stage kind, and the release-style reference next to the project's step."""

from __future__ import annotations

import dataclasses
import gc
import math
import time

import torch
from torch.utils.data import DataLoader

from sfc.bench import measure, steps
from sfc.models.dilated import get_dilated_impl

REF_RTOL = 1e-4  # loss equality of project vs release-style reference, float32


def measure_stage(kind: str, bc: steps.BenchConfig, iters: int, warmup: int,
                  eval_images: int = 2, flops: bool = True, ckpt_dir=None, log=print,
                  profile: bool = False, barrier=None) -> dict:
    """Median training-iteration time, peak memory, FLOP/step and TFLOP/s, and the per-image
    validation time of one stage kind; with `profile` the profiler's counts of one iteration
    (kernels, launches, host syncs: `measure.profile_counts`). `barrier`: waited on after the
    warm-up, before the timed iterations (`measure_side_by_side`)."""
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
    if barrier is not None:
        barrier.wait(timeout=SIDE_BY_SIDE_TIMEOUT_S)
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
    eval_s = eval_b1 = None
    if eval_images > 0:  # batched (--eval-batch-size): batch 1 too, the release's, to compare
        eval_s = measure_eval(stage, kind, bc, eval_images, bc.val_batch_size)
        if bc.val_batch_size > 1:
            eval_b1 = measure_eval(stage, kind, bc, eval_images)
    rec = {**_setup(kind, bc, stage, runner, dev),
           "capture_s": runner.capture_s if runner is not None else None,
           "step_s": s, "step_times_s": times, "opt_s": opt_s,
           "flops_per_step": n_flops,
           "tflops_per_s": (n_flops / s / 1e12 if n_flops and s > 0 else None),
           "peak_mem_bytes": int(mem.peak),
           "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "rss_sampled",
           "eval_s_per_image": eval_s, "eval_batch_size": bc.val_batch_size,
           "eval_s_per_image_batch1": eval_b1, "counts": counts,
           "loss_terms": {k: float(v) for k, v in state["terms"].items()}}
    return rec


def _setup(kind: str, bc: steps.BenchConfig, stage, runner, dev: torch.device) -> dict:
    """What a row measured: the stage kind and the configuration its step ran with."""
    return {"kind": kind, "precision": bc.precision, "channels_last": bc.channels_last,
            "source_size": list(bc.source_size), "target_size": list(bc.target_size),
            "foreach_sgd": bc.foreach_sgd, "source_prev_forward": bc.source_prev_forward,
            "compile": bc.compile, "check_every": stage.guard.every,
            "cuda_graph": steps.graph_label(runner, dev), "dilated_impl": get_dilated_impl(),
            "stack_forwards": stage.stack}


SIDE_BY_SIDE_TIMEOUT_S = 600.0


def _side_by_side_worker(kind, bc, iters, warmup, ckpt_dir, settings, barrier, queue, rank):
    """One of the processes of `measure_side_by_side` (spawned: its own CUDA context, as a
    second training job has)."""
    try:
        from sfc.models.aspp_gemm import set_aspp_impl
        from sfc.models.dilated import set_dilated_impl

        torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
        set_aspp_impl(settings["aspp_impl"])
        set_dilated_impl(settings.get("dilated_impl", "native"))
        if settings.get("threads"):
            torch.set_num_threads(settings["threads"])
        rec = measure_stage(kind, bc, iters, warmup, eval_images=0, flops=False,
                            ckpt_dir=ckpt_dir, barrier=barrier)
        queue.put({"rank": rank, "rec": rec})
    except BaseException as e:  # noqa: BLE001 - reported by the parent, with the others stopped
        barrier.abort()
        queue.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})


def measure_side_by_side(kind: str, bc: steps.BenchConfig, n: int, iters: int, warmup: int,
                         ckpt_dir, settings: dict, log=print) -> dict:
    """`n` processes training the same stage kind on one device at once, as the update and
    reference runs of a stage one can (independent runs, each its own process): each builds,
    warms up, waits for the others, then times `iters` iterations. The row's `step_s` is the
    slowest process's median (the pair is done when both are), `step_s_each` every process's."""
    import contextlib
    import queue as queue_mod
    from pathlib import Path

    import torch.multiprocessing as mp

    if n < 2:
        raise ValueError(f"side by side needs at least 2 processes, got {n}")
    if not (Path(ckpt_dir) / "sfm.pth").is_file():  # written once, not raced by the workers
        steps.write_input_checkpoints(Path(ckpt_dir), bc)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_side_by_side_worker, daemon=True,
                         args=(kind, bc, iters, warmup, str(ckpt_dir), settings, barrier,
                               queue, r)) for r in range(n)]
    for p in procs:
        p.start()
    got, deadline = [], time.monotonic() + SIDE_BY_SIDE_TIMEOUT_S
    try:
        while len(got) < n:
            try:
                got.append(queue.get(timeout=1.0))
                continue
            except queue_mod.Empty:
                pass
            gone = [r for r, p in enumerate(procs) if not p.is_alive()]
            if gone:  # what a process sent before it ended may still be in transit
                with contextlib.suppress(queue_mod.Empty):
                    while True:
                        got.append(queue.get(timeout=2.0))
            done = {g["rank"] for g in got}
            dead = [(r, procs[r].exitcode) for r in gone if r not in done]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.terminate()
                why = (", ".join(f"process {r} ended with exit code {c} and no result"
                                 for r, c in dead) or f"no result in {SIDE_BY_SIDE_TIMEOUT_S} s")
                raise RuntimeError(f"side-by-side {kind}: {why}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    got.sort(key=lambda g: g["rank"])
    errors = [f"process {g['rank']}: {g['error']}" for g in got if "error" in g]
    if errors:
        raise RuntimeError(f"side-by-side {kind}: " + "; ".join(errors))
    recs = [g["rec"] for g in got]
    each = [r["step_s"] for r in recs]
    rec = dict(recs[0])
    rec.update({"side_by_side": n, "side_by_side_mode": "processes",
                "mps": measure.mps_running(), "step_s": max(each),
                "step_s_each": each,
                "step_times_s": [r["step_times_s"] for r in recs],
                "peak_mem_bytes": max(r["peak_mem_bytes"] for r in recs), "opt_s": None,
                "counts": None, "loss_terms": {}})
    return rec


def measure_streams(kind: str, bc: steps.BenchConfig, n: int, iters: int, warmup: int,
                    ckpt_dir=None, log=print) -> dict:
    """`n` runs of one stage kind in one process, each captured as its own CUDA graph
    (`--cuda-graph`) and replayed on its own stream, all launched before any is waited for:
    their kernels can run at the same time on the device, which separate processes' kernels
    cannot without NVIDIA's MPS (each process has its own CUDA context, and the device
    time-slices between contexts). Times, in the same process, run 0 alone and then an
    iteration of all `n` (the row's `step_s`: what the pair costs per iteration, as for
    processes side by side). On the CPU the graphs are emulated and run one after the other:
    the plumbing only."""
    if n < 2:
        raise ValueError(f"side by side needs at least 2 runs, got {n}")
    if not bc.cuda_graph or not steps.capturable(kind):
        raise ValueError(f"side by side on streams replays CUDA graphs: {kind} needs "
                         "--cuda-graph (the segnet and accel kinds)")
    dev = torch.device(bc.device)
    runs = []
    for r in range(n):  # the runs of a pair: other weights, other batches
        rbc = dataclasses.replace(bc, seed=bc.seed + r)
        stage = steps.build(kind, rbc, ckpt_dir=ckpt_dir)
        runs.append({"stage": stage, "runner": steps.graph_runner(kind, stage, rbc),
                     "batch": steps.make_batches(kind, rbc, seed=rbc.seed), "i": 0,
                     "terms": {}})

    def one(run, concurrent=False):
        st = run["stage"]
        st.train_mode()
        st.set_iteration_lr(run["i"])
        run["terms"] = run["runner"](run["i"], run["batch"], concurrent=concurrent)
        run["i"] += 1

    def together():
        for run in runs:
            one(run, concurrent=True)
        for run in runs:
            run["runner"].join()

    for run in runs:  # eager warm-up and capture, one run after the other
        measure.time_calls(lambda run=run: one(run), 0,
                           max(warmup, run["runner"].calls_to_capture),
                           dev)
    alone = measure.time_calls(lambda: one(runs[0]), iters, 0, dev)
    with measure.memory_block(dev) as mem:
        times = measure.time_calls(together, iters, 0, dev)
    s, s_alone = measure.median(times), measure.median(alone)
    return {**_setup(kind, bc, runs[0]["stage"], runs[0]["runner"], dev),
            "capture_s": max(run["runner"].capture_s for run in runs),
            "side_by_side": n, "side_by_side_mode": "streams",
            "step_s": s, "step_times_s": times, "step_s_each": [s] * n,
            "step_s_alone": s_alone, "step_times_alone_s": alone, "opt_s": None,
            "flops_per_step": None, "tflops_per_s": None, "peak_mem_bytes": int(mem.peak),
            "peak_mem_kind": "cuda_max_allocated" if dev.type == "cuda" else "rss_sampled",
            "eval_s_per_image": None, "counts": None,
            "loss_terms": {k: float(v) for k, v in runs[0]["terms"].items()}}


def release_memory(device: str) -> None:
    """Free the previous stage's networks before building the next one."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure_eval(stage, kind: str, bc: steps.BenchConfig, n: int,
                 batch_size: int = 1) -> float:
    """Seconds per validation image of `stage.validate` (the engine's validation) over `n`
    images in batches of `batch_size` (the engine's --val-batch-size), after one warm-up
    batch."""
    b = max(1, int(batch_size))
    items = steps.make_val_items(kind, bc, n + b)
    dev = torch.device(bc.device)
    stage.validate(DataLoader(items[:b], batch_size=b), progress=False)
    measure.sync(dev)
    times = measure.time_calls(
        lambda: stage.validate(DataLoader(items[b:], batch_size=b), progress=False), 1, 0, dev)
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
    runner = steps.graph_runner(kind, stage, bc)  # --cuda-graph: the project's step replayed
    if runner is not None:
        warmup = max(warmup, runner.calls_to_capture)  # the eager warm-up and the capture
    src, tgt = steps.make_batches(kind, bc, seed=bc.seed)
    t_proj, t_ref, m_proj, m_ref, diffs, first = [], [], [], [], [], None
    def one(who: str, i: int) -> tuple[dict, float, int | None]:
        """(loss terms, seconds, CUDA peak bytes above what was allocated before the step)."""
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        with measure.memory_block(dev) as mem:
            measure.sync(dev)
            t0 = time.perf_counter()
            terms = (ref.step(src, tgt, i) if who == "ref"
                     else steps.train_iteration(stage, src, tgt, i, runner=runner))
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
            "cuda_graph": steps.graph_label(runner, dev),
            "stack_forwards": stage.stack,
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
