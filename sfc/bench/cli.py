"""`python -m sfc.bench` — per-stage training-step benchmark, release-style reference, loaders.

    python -m sfc.bench                                  # CPU, 256×128, all five stages, fp32
    python -m sfc.bench --device cuda --precision fp32 bf16 --channels-last --cudnn-benchmark
    python -m sfc.bench --stages segnet_sfc --reference --size 256 128 --iters 3 --warmup 1
    python -m sfc.bench --stages segnet --loaders --json out.json
    python -m sfc.bench --device cuda --check-every 50 --cuda-graph both --side-by-side 2
    python -m sfc.bench --device cuda --cuda-graph on --side-by-side 2 --side-by-side-mode both

Sizes: CUDA defaults to the faithful 1280×720 source (VIPER) and 1024×512 target (Cityscapes);
CPU to 256×128 for both. The table is printed and written next to the JSON (`.md`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from sfc import flags
from sfc.bench import measure, report, run, steps
from sfc.bench.loaders import measure_loaders
from sfc.models import dilated
from sfc.models.aspp_gemm import MODES, set_aspp_impl
from sfc.train.guard import resolve_every

FAITHFUL = {"source": (1280, 720), "target": (1024, 512)}
CPU_DEFAULT = (256, 128)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sfc.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")
    a("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
      help="source and target size (W H); default CUDA 1280 720 / 1024 512, CPU 256 128")
    a("--source-size", type=int, nargs=2, metavar=("W", "H"), default=None,
      help="source size only (overrides --size)")
    a("--target-size", type=int, nargs=2, metavar=("W", "H"), default=None,
      help="target size only (overrides --size)")
    a("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
      help="one row per precision (bf16 = autocast, the engine's --amp bf16)")
    a("--stages", nargs="*", choices=list(steps.KINDS), default=list(steps.KINDS),
      help="stage kinds to time (none: only --reference / --loaders)")
    a("--iters", type=int, default=5, help="timed iterations per stage")
    a("--warmup", type=int, default=2, help="untimed iterations before timing")
    a("--no-flops", dest="flops", action="store_false",
      help="skip the FLOP count (one extra step per stage)")
    a("--eval-images", type=int, default=2,
      help="validation images timed per stage for the evaluation-cost estimate (0: skip)")
    a("--eval-batch-size", type=int, default=1,
      help="time the validation in batches of this many clips (the engine's --val-batch-size; "
           "> 1: batch 1 is timed too, and the pipeline estimate takes the batched time)")
    a("--layers", type=int, nargs=4, default=(3, 4, 23, 3), help="ResNet block counts")
    a("--width", type=int, default=64, help="ResNet stem width")
    a("--channels-last", action="store_true",
      help="channels_last networks (the engine's --channels-last; CUDA only)")
    a("--compile", default="none", choices=list(flags.COMPILE_MODES),
      help="torch.compile the networks (the engine's --compile); the warm-up steps absorb the "
           "compilation")
    a("--cuda-graph", choices=["off", "on", "both"], default="off",
      help="the engine's --cuda-graph: the iteration captured as one CUDA graph and replayed "
           "(segnet and accel kinds; the SFM stays eager); both: an eager row and a graph row "
           "per kind, in the same process. Needs --check-every N > 1. On the CPU the graph is "
           "emulated (sfc.train.graphed.TapeBackend: a dry run of the plumbing, not a timing)")
    a("--stack-forwards", choices=["off", "on", "both"], default="off",
      help="the engine's --stack-forwards: the SFC kinds' two target forwards as one batch "
           "with per-forward BatchNorm statistics (sfc.models.stacked); both: a row with them "
           "apart and a stacked row per SFC kind (other kinds: one row). Also the project's "
           "step of --reference")
    a("--side-by-side", type=int, default=0, metavar="N",
      help="also time N processes training the same stage kind on the device at once (as the "
           "update and reference runs of a stage one can run), after each single-process row; "
           "with N = 2 the pipeline estimates take the pairs side by side where that is faster")
    a("--side-by-side-mode", choices=["processes", "streams", "both"], default="processes",
      help="how --side-by-side runs its N: processes (each its own CUDA context: the device "
           "time-slices between them unless NVIDIA's MPS runs), streams (N runs in one process, "
           "each its own CUDA graph on its own stream, replayed at the same time: graph rows "
           "only), or both")
    a("--check-every", default="auto", metavar="N|auto",
      help="the engine's --check-every: 1 reads each finiteness check at once (host syncs), "
           "N > 1 keeps them on the device (sfc.train.guard); auto: 1 on the CPU, 50 on CUDA")
    a("--profile-counts", action="store_true",
      help="also profile one iteration per stage: kernels run, launch calls, host syncs, "
           "sync ops (torch.profiler)")
    a("--pipeline-from", nargs="+", default=None, metavar="JSON",
      help="also extrapolate the pipeline from the fastest step per stage kind found in these "
           "earlier bench JSONs (and this run's rows); evaluation from the rows that have it")
    a("--foreach-sgd", action="store_true",
      help="replace RepeatedSGD by the proposed multi-tensor version (sfc.bench.fastopt)")
    a("--no-source-prev-forward", dest="source_prev_forward", action="store_false",
      help="SFC stage one without the unused source forward (the engine's switch of quirk 7; "
           "changes only BN running statistics); the release-style reference keeps it")
    a("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    a("--aspp-impl", choices=list(MODES), default="auto",
      help="DeepLab classifier form in the project's training steps: GEMM (sfc.models.aspp_gemm)"
           " or nn.Conv2d; auto = GEMM on the CPU only (default). The release-style reference "
           "always uses nn.Conv2d")
    a("--dilated-impl", choices=list(dilated.MODES), default="native",
      help="the backbone's dilated convolutions in the project's steps: native nn.Conv2d or "
           "s2b (space-to-batch, sfc.models.dilated; the engine's --dilated-impl). The "
           "release-style reference always runs them native")
    a("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    a("--reference", action="store_true",
      help="also time the release-style reference (sfc.bench.reference) of SFC stage one and "
           "the SFM in lockstep with the project's step; losses must agree (rtol 1e-4)")
    a("--reference-stages", nargs="+", choices=["segnet_sfc", "sfm"],
      default=["segnet_sfc", "sfm"], help="which references to run with --reference")
    a("--reference-iters", type=int, default=None, help="timed reference iterations "
      "(default --iters)")
    a("--loaders", action="store_true",
      help="measure the data loaders on a native-size synthetic tree (written to a temp dir)")
    a("--loader-samples", type=int, default=8, help="timed samples per loader")
    a("--loader-workers", type=int, default=0,
      help="also measure each loader with this many workers (0: only one worker)")
    a("--loader-data", default=None,
      help="read the loaders' tree from this data root instead of generating one")
    a("--steps-from", nargs="+", default=None, metavar="JSON",
      help="--loaders: take the step times that set the pace from these earlier bench JSONs "
           "(fastest per stage) instead of this run's stages")
    a("--json", default=None, help="write the results here (and the table to the same path "
                                    "with .md); default: print only")
    a("--seed", type=int, default=0, help="seed of the synthetic inputs and networks")
    return p


def _sizes(args) -> tuple[tuple[int, int], tuple[int, int]]:
    if args.size is not None:
        src = tgt = tuple(args.size)
    elif args.device == "cuda":
        src, tgt = FAITHFUL["source"], FAITHFUL["target"]
    else:
        src = tgt = CPU_DEFAULT
    return tuple(args.source_size or src), tuple(args.target_size or tgt)


def _meta(args) -> dict:
    dev = args.device
    name = (torch.cuda.get_device_name(0) if dev == "cuda"
            else (platform.processor() or platform.machine()) + f" ({os.cpu_count()} CPUs)")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": dev, "device_name": name, "threads": torch.get_num_threads(),
            "host_cpu": _host_cpu(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "aspp_impl": args.aspp_impl, "dilated_impl": args.dilated_impl,
            "mps": measure.mps_running(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "command": "python -m sfc.bench " + " ".join(sys.argv[1:])}


def _host_cpu() -> str:
    """The host CPU's model and core count: at batch 1 the CPU launches every kernel, so a GPU
    step time can depend on it (compare runs on different hosts with care)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs)"


def _rows(res: dict, paths) -> list[dict]:
    """This run's stage rows and those of the earlier bench JSONs `paths` (missing ones
    skipped)."""
    recs = list(res["stages"])
    for p in paths or ():
        if Path(p).is_file():
            recs += json.loads(Path(p).read_text()).get("stages", [])
    return recs


def _pace(res: dict, paths) -> dict[str, float]:
    """Stage kind → the fastest measured step time (s): the pace the loaders must keep."""
    fastest: dict[str, float] = {}
    for r in _rows(res, paths):
        fastest[r["kind"]] = min(fastest.get(r["kind"], float("inf")), r["step_s"])
    return fastest


def fastest_pipeline(res: dict, paths) -> dict:
    """The pipeline extrapolated from the fastest measured step per stage kind over this run's
    rows and those of `paths` (earlier bench JSONs of the same sizes); evaluation per kind from
    the fastest row that measured it. `configs` says which configuration each kind took."""
    return _fastest(_rows(res, paths))


def _fastest(rows: list[dict]) -> dict:
    """`measure.pipeline_estimate` from the fastest row per stage kind (evaluation from the
    fastest row that measured it), with the configuration each kind took. A row of 2
    processes side by side counts for the kinds whose runs come in pairs (update and
    reference): each run of the pair is charged half the pair's time. An emulated graph row
    (the CPU) times nothing real: skipped."""
    step, ev, configs = {}, {}, {}
    for r in rows:
        k, n = r["kind"], r.get("side_by_side") or 1
        if r.get("cuda_graph") == "emulated":
            continue
        if n == 1:
            s, label = r["step_s"], report.config_label(r)
        elif n == 2 and k in measure.PAIRED_KINDS:
            s, label = r["step_s"] / 2, report.config_label(r) + " (each run: half the pair's)"
        else:
            continue
        if s < step.get(k, float("inf")):
            step[k], configs[k] = s, label
        if r.get("eval_s_per_image") is not None:
            ev[k] = min(ev.get(k, float("inf")), r["eval_s_per_image"])
    out = measure.pipeline_estimate(step, ev)
    out["configs"] = configs
    return out


# an off|on|both flag of the bench as the settings measured
SWITCH_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def _modes(modes: tuple[bool, ...], applies: bool) -> tuple[bool, ...]:
    """The settings of an off|on|both switch measured for one stage kind: all where the switch
    `applies` to the kind, else the first only — one row, which the switch does not change
    (`--cuda-graph` for a kind the engine does not capture, `--stack-forwards` for a kind
    without the SFC term)."""
    return modes if applies else modes[:1]


def _side_modes(args, kind: str, graph: bool) -> tuple[str, ...]:
    """The side-by-side measurements after a row of `kind`: none without --side-by-side N ≥ 2;
    streams only for a graph row (they replay CUDA graphs), and first (a time limit that cuts
    the part short takes the processes row)."""
    if args.side_by_side < 2:
        return ()
    modes = {"processes": ("processes",), "streams": ("streams",),
             "both": ("streams", "processes")}[args.side_by_side_mode]
    return tuple(m for m in modes if m == "processes" or (graph and steps.capturable(kind)))


def _attempt(res: dict, name: str, say, measure_row, *args, **kwargs):
    """One row's measurement, `measure_row(*args, **kwargs)`; an error is logged with its
    traceback, kept in `res["errors"]`, and the benchmark goes on with the next row (a failed
    `--cuda-graph` capture must not cost the rows after it). Returns the row or None."""
    import traceback

    try:
        return measure_row(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
        say(f"[bench] {name}: FAILED: {type(e).__name__}: {e}\n"
            + "".join(traceback.format_exc().splitlines(True)[-30:]))
        res.setdefault("errors", []).append({"row": name,
                                             "error": f"{type(e).__name__}: {e}"})
        run.release_memory(res["meta"]["device"])
        return None


def _keep(res: dict, key: str, rec: dict, args) -> None:
    """Add one measured row, free its networks, write the JSON so far (a part cut short by
    its time limit keeps what it measured)."""
    res[key].append(rec)
    run.release_memory(args.device)
    _write(res, args.json)


def _write(res: dict, path: str | None) -> None:
    if path is None:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, p)
    p.with_suffix(".md").write_text(report.full_report(res))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    graph_modes = SWITCH_MODES[args.cuda_graph]
    stack_modes = SWITCH_MODES[args.stack_forwards]
    if args.cuda_graph != "off" and resolve_every(args.check_every, args.device) == 1:
        raise SystemExit("--cuda-graph needs the deferred checks: --check-every N > 1")
    if args.eval_batch_size < 1:
        raise SystemExit(f"--eval-batch-size {args.eval_batch_size}: expected a number >= 1")
    if args.side_by_side_mode == "streams" and args.cuda_graph == "off":
        raise SystemExit("--side-by-side-mode streams replays CUDA graphs: add --cuda-graph on "
                         "or both")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    set_aspp_impl(args.aspp_impl)
    dilated.set_dilated_impl(args.dilated_impl)
    src, tgt = _sizes(args)
    res = {"meta": _meta(args), "stages": [], "pipeline": {}, "reference": [], "loaders": None}
    log = lambda s: print(s, flush=True)  # noqa: E731

    def config(precision: str, **extra) -> steps.BenchConfig:
        return steps.BenchConfig(device=args.device, source_size=src, target_size=tgt,
                                 precision=precision, layers=tuple(args.layers),
                                 width=args.width, channels_last=args.channels_last,
                                 source_prev_forward=args.source_prev_forward, seed=args.seed,
                                 check_every=args.check_every,
                                 val_batch_size=args.eval_batch_size, **extra)

    with tempfile.TemporaryDirectory(prefix="sfc-bench-") as ckpt_dir:
        for prec in args.precision:
            for kind in args.stages:
                for graph, stack in (
                        (g, st) for g in _modes(graph_modes, steps.capturable(kind))
                        for st in _modes(stack_modes, kind in steps.STACKING_KINDS)):
                    bc = config(prec, foreach_sgd=args.foreach_sgd, compile=args.compile,
                                cuda_graph=graph, stack_forwards=stack)
                    name = f"{kind} {prec}{' graph' if graph else ''}{' stacked' if stack else ''}"
                    log(f"[bench] {name} source {src} target {tgt} ...")
                    rec = _attempt(res, name, log, run.measure_stage,
                                   kind, bc, args.iters, args.warmup, args.eval_images,
                                   args.flops, ckpt_dir=ckpt_dir, log=log,
                                   profile=args.profile_counts)
                    if rec is None:
                        continue
                    log(f"[bench] {name}: {rec['step_s'] * 1e3:.1f} ms/step, "
                        f"{rec['peak_mem_bytes'] / measure.GIB:.2f} GiB, "
                        f"{rec['tflops_per_s'] or float('nan'):.2f} TFLOP/s")
                    _keep(res, "stages", rec, args)
                    for mode in _side_modes(args, kind, graph):
                        n = args.side_by_side
                        log(f"[bench] {name}, {n} side by side ({mode}) ...")
                        if mode == "processes":
                            rec = _attempt(res, f"{name} ×{n}", log,
                                           run.measure_side_by_side, kind, bc, n,
                                           args.iters, args.warmup, ckpt_dir,
                                           {"cudnn_benchmark": args.cudnn_benchmark,
                                            "aspp_impl": args.aspp_impl,
                                            "dilated_impl": args.dilated_impl,
                                            "threads": args.threads},
                                           log=log)
                        else:
                            rec = _attempt(res, f"{name} ×{n} streams", log,
                                           run.measure_streams, kind, bc, n, args.iters,
                                           args.warmup, ckpt_dir=ckpt_dir, log=log)
                        if rec is None:
                            continue
                        log(f"[bench] {name} ×{n} ({mode}): " + ", ".join(
                            f"{t * 1e3:.1f}" for t in rec["step_s_each"]) + " ms/step"
                            + (f" (alone in the same process: {rec['step_s_alone'] * 1e3:.1f})"
                               if "step_s_alone" in rec else ""))
                        _keep(res, "stages", rec, args)
            for graph in graph_modes:
                # eager rows; with graph rows: the faster of the two per kind (SFM: eager)
                mine = [r for r in res["stages"]
                        if r["precision"] == prec and (graph or not r.get("cuda_graph"))]
                if mine:
                    res["pipeline"][prec + (", fastest with --cuda-graph" if graph else "")] \
                        = _fastest(mine)
            _write(res, args.json)
        if args.reference:
            for kind, graph, stack in ((k, g, st) for k in args.reference_stages
                                       for g in _modes(graph_modes, steps.capturable(k))
                                       for st in _modes(stack_modes,
                                                        k in steps.STACKING_KINDS)):
                bc = config("fp32", cuda_graph=graph, stack_forwards=stack)
                what = f"{kind}{' graph' if graph else ''}{' stacked' if stack else ''}"
                log(f"[bench] reference {what} fp32 source {src} target {tgt} ...")
                rec = _attempt(res, f"reference {what}", log,
                               run.measure_reference, kind, bc,
                               args.reference_iters or args.iters, args.warmup,
                               ckpt_dir=ckpt_dir, log=log)
                if rec is None:
                    continue
                log(f"[bench] reference {kind}: project {rec['project_step_s'] * 1e3:.1f} ms, "
                    f"release-style {rec['reference_step_s'] * 1e3:.1f} ms, "
                    f"speed-up {rec['speedup']:.2f}x, losses equal: {rec['losses_equal']}")
                _keep(res, "reference", rec, args)
    if args.pipeline_from:
        res["pipeline"]["fastest measured"] = fastest_pipeline(res, args.pipeline_from)
        _write(res, args.json)
    if args.loaders:
        res["loaders"] = measure_loaders(args.loader_samples, _pace(res, args.steps_from),
                                         args.device, args.loader_data, args.loader_workers,
                                         log=log)
        _write(res, args.json)
    print(report.full_report(res), flush=True)
    if res.get("errors"):
        print("ERROR: rows that failed (the others were measured): " + "; ".join(
            f"{e['row']}: {e['error']}" for e in res["errors"]), file=sys.stderr)
        return 1
    bad = [r["kind"] for r in res["reference"] if not r["losses_equal"]]
    if bad:
        print(f"ERROR: release-style reference losses differ from the project's for {bad}",
              file=sys.stderr)
        return 2
    return 0
