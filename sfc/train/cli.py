"""`python -m sfc.train --stage {segnet,accel,sfm} ...` — one run of the SFC pipeline.

The exp/**/script/*.sh recipes call this with the paper's hyper-parameters spelled out; every
flag below defaults to the release's value. Later flags override earlier ones, so a script's
"$@" can override what it sets. Launching the same command again resumes from `OUT/last.pt`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sfc import flags
from sfc.data import DATASET_DIRS, get_protocol, make_dataset
from sfc.data.viper import release_val_list
from sfc.models import dilated
from sfc.train import graphed
from sfc.train.guard import resolve_every

SOURCES = {"viper": 15, "synthia_seq": 12}  # source → number of train classes
SOURCE_SIZES = {"viper": (1280, 720), "synthia_seq": (1280, 640)}
# stage → (lr, weight decay, eval every) of the release (method §5)
STAGE_DEFAULTS = {"segnet": (2.5e-4, 5e-4, 2000), "accel": (5e-4, 5e-4, 2000),
                  "sfm": (1e-4, 4e-4, 4000), "flownet": (1e-4, 4e-4, 5000)}
# stage → (iterations without, with the SFC loss) of the release (method §5)
ITERS = {"segnet": (80000, 120000), "accel": (80000, 160000), "sfm": (80000, 80000),
         "flownet": (300000, 300000)}  # flownet: the common FlowNet code's 300 × 1000
BATCH = {"flownet": 8}  # clips per step where it is not the release's 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sfc.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--stage", required=True, choices=["segnet", "accel", "sfm", "flownet"],
      help="stage kind: single-frame SegNet (stage one), Accel (stage two), SFM, or flownet: "
           "a FlowNetS supervised on Flying Chairs (--data ROOT with ROOT/FlyingChairs/; the "
           "--chairs-init of the accel stages)")
    a("--source", default="viper", choices=sorted(SOURCES),
      help="source dataset; sets the classes (15 / 12) and the Cityscapes class map")
    a("--data", default="data", help="data root holding VIPER/, Cityscapes/, SynthiaSeq/")
    a("--out", required=True, help="run directory (resumed if it holds last.pt)")
    a("--iters", type=int, default=None,
      help="training iterations (default: the release's for the stage and SFC weight — "
           "segnet 80000 / 120000 with SFC, accel 80000 / 160000 with SFC, sfm 80000; flownet "
           "300000)")
    a("--eval-every", type=int, default=None,
      help="validate and write last.pt every N iterations (default 2000; SFM 4000; flownet "
           "5000)")
    a("--log-every", type=int, default=50, help="log training losses every N iterations")
    a("--lr", type=float, default=None,
      help="base LR (segnet 2.5e-4 poly, heads 10x; accel 5e-4 after warm-up; sfm Adam 1e-4; "
           "flownet Adam 1e-4, halved at 1/3, 1/2 and 2/3 of the run)")
    a("--warmup-lr", type=float, default=5e-5, help="accel: LR during the warm-up")
    a("--warmup-iters", type=int, default=1000, help="accel: warm-up length")
    a("--warmup-order", choices=["after", "before"], default=None,
      help="accel: the release sets the LR after each step in FlowNet_pretrain stage two "
           "('after': first step at --lr) and before it in SFC stage two ('before'); default "
           "after without SFC, before with it")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=None,
      help="L2 weight decay (SGD 5e-4; SFM Adam 4e-4, added to the gradient, not AdamW; "
           "flownet 4e-4 on the weights, none on the biases)")
    a("--optimizer", choices=["release", "clean"], default="release",
      help="segnet: 'release' updates most backbone tensors 3-4x per step as the release's "
           "duplicated parameter list does (method §3.1); 'clean' once")
    a("--sfc-weight", type=float, default=0.0,
      help="weight of the SFC loss on target video (0: source only; paper 0.005 stage one, "
           "0.001 stage two)")
    a("--scale", type=float, default=100.0, help="softmax scale of the soft masks")
    a("--bn-control", action="store_true",
      help="SFC stages: the control run — every target forward happens as with the SFC loss "
           "(same networks, modes, BatchNorm updates, data order; the SegNet's through its "
           "backbone, which holds every BN), but no SFC loss is computed or back-propagated "
           "(the flow networks are not loaded); separates the SFC loss from BatchNorm "
           "adaptation to the target")
    a("--no-source-prev-forward", dest="source_prev_forward", action="store_false",
      help="SFC stage one: skip the release's unused forward of source frame t-1 (quirk 7; "
           "it only moves BN statistics)")
    a("--seed", type=int, default=0, help="seed of Python/NumPy/torch and of the data orders")
    a("--select", choices=["best", "last"], default="best",
      help="which checkpoint of an earlier run directory to consume (quirk 1: best)")
    a("--allow-unfinished", action="store_true",
      help="consume an earlier run that has not finished (no result.json); refused otherwise")
    a("--batch-size", type=int, default=None,
      help="clips per domain per process (paper 1; flownet: image pairs, default 8)")
    a("--source-size", type=int, nargs=2, metavar=("W", "H"), default=None,
      help="source resize (VIPER 1280 720; SYNTHIA-Seq 1280 640 after the crop; flownet: the "
           "Flying Chairs pairs, default their own size)")
    a("--target-size", type=int, nargs=2, metavar=("W", "H"), default=(1024, 512),
      help="Cityscapes resize (train and val)")
    a("--layers", type=int, nargs=4, default=(3, 4, 23, 3), help="ResNet block counts")
    a("--width", type=int, default=64, help="ResNet stem width")
    a("--imagenet-init", default=None,
      help="segnet: DeepLab-v2 ImageNet init file, or 'none' for random init")
    a("--chairs-init", default=None,
      help="accel: Flying Chairs FlowNetS for Accel's FlowNet — the release's "
           "flownet_flyingchairs_pretrained.pth, a --stage flownet run directory, its best.pt or "
           "its exported .pth — or 'none' (flownet: an optional init to fine-tune)")
    a("--update-ckpt", default=None, help="accel: stage-one 'update' run dir or checkpoint")
    a("--reference-ckpt", default=None, help="accel: stage-one 'reference' run dir/checkpoint")
    a("--flownet-ckpt", default=None,
      help="FlowNet_pretrain stage-two run dir/checkpoint (flownet_global; SFM init)")
    a("--sfm-ckpt", default=None, help="SFM run dir/checkpoint (SFC stages)")
    a("--source-list", default=None, help="list file of source training clips")
    a("--val-list", default=None,
      help="list file of validation clips (default: all annotated val frames; the SFM stage "
           "on VIPER uses the release's 460-entry list shipped in sfc/data/lists/ when its "
           "frames are under the data root)")
    a("--synthia-val-frames", type=int, default=50,
      help="SFM on SYNTHIA-Seq: the last N annotated frames are held out as source val")
    a("--val-limit", type=int, default=None, help="evaluate only the first N val clips")
    a("--val-cache-gb", type=float, default=8.0, metavar="GB",
      help="keep the validation batches in memory after the first complete evaluation, up to "
           "this many GiB per process (Cityscapes val at 1024×512: 1.7), so later "
           "evaluations read no files; the same batches, the same results; 0: off")
    a("--val-batch-size", type=int, default=1,
      help="validation clips per batch (default 1, the release's): eval mode uses the "
           "BatchNorm running statistics, so a larger batch gives the same predictions up to "
           "the convolutions' summation order, in fewer, larger kernels")
    a("--num-workers", default="auto", metavar="N|auto",
      help="data-loader workers per loader; auto: on the CPU 4 (at most the usable CPUs), on "
           "CUDA the CPUs this process "
           "may use, shared by the training processes on this node (torchrun's "
           "LOCAL_WORLD_SIZE, times SFC_JOBS_PER_NODE) less one, split over the training "
           "loaders (source, and target for the SFC stages), between 1 and 8")
    a("--device", default=None, help="cuda / cpu (default: cuda:LOCAL_RANK if available)")
    a("--amp", choices=["none", "bf16"], default="none", help="autocast (CUDA); fp32 default")
    a("--channels-last", action="store_true", help="channels_last memory format (CUDA)")
    a("--sfc-precision", choices=["float32", "autocast"], default="float32",
      help="with --amp bf16: the SFC term's forwards in float32 (bf16 loses most of its "
           "gradient, docs/pipeline.md) or under the same autocast as the source term")
    a("--compile", choices=list(flags.COMPILE_MODES),
      default="none",
      help="torch.compile the networks (none: eager, the reference; see docs/benchmark.md); "
           "the state-dict keys and checkpoints are unchanged")
    a("--check-every", default="auto", metavar="N|auto",
      help="finiteness checks (sfc.train.guard): 1 reads each check at once (a host sync per "
           "loss, flow and parameter check); N > 1 keeps flags on the device, discards a bad "
           "iteration's update there and reads them every N iterations and before every "
           "evaluation and save (exit 3, last.pt untouched, as with 1); auto: 1 on the CPU, "
           "50 on CUDA")
    a("--cuda-graph", action="store_true",
      help="capture the training iteration as one CUDA graph after 3 eager ones and replay it "
           "(segnet and accel stages, one CUDA process, deferred checks; the SGD update then "
           "takes its LR from a device tensor: equal to the eager step within float32 "
           "rounding; sfc.train.graphed)")
    a("--tf32", choices=["on", "off"], default=None,
      help="TF32 for CUDA convolutions and matmuls (default: PyTorch's own — convolutions on, "
           "matmuls off); the log and config.json record what was used")
    a("--dilated-impl", choices=list(dilated.MODES), default="native",
      help="the backbone's dilated 3x3 convolutions (layer3, layer4): native nn.Conv2d, or "
           "s2b, the same convolution as an ordinary one on the space-to-batch view (equal "
           "within float rounding; for GPUs where dilated kernels are slow: python -m "
           "sfc.bench.convs; sfc.models.dilated)")
    a("--stack-forwards", action="store_true",
      help="SFC stages: run the two target forwards of an iteration (stage one: the SegNet on "
           "frames t-1 and t; stage two: Accel on both clips) as one batch, each with its own "
           "BatchNorm statistics and the running statistics moved in the same order — the "
           "same numbers within float rounding, in kernels of twice the work; whether faster: "
           "sfc.bench --stack-forwards both "
           "(sfc.models.stacked)")
    a("--threads", type=int, default=None,
      help="CPU threads of this process (torch.set_num_threads; default: PyTorch's)")
    a("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
      help="training progress: a bar (terminal), one plain line every --progress-every "
           "seconds (job logs), or nothing; auto: bar on a terminal, else lines")
    a("--progress-every", type=float, default=30.0,
      help="seconds between progress lines (--progress lines)")
    a("--force-unlock", action="store_true",
      help="take over the run directory's lock although its holder (another host, another "
           "job) may still run — only when you know that job is gone")
    a("--stop-after", type=int, default=-1,
      help="stop (saving last.pt) after this iteration, as an interrupt would; for tests")
    return flags.quiet_off_rank_zero(p)


def validate(args: argparse.Namespace) -> None:
    """Every numeric and device flag, before any work (FlagError: one line, exit 2)."""
    for name in ("iters", "eval_every", "log_every", "batch_size", "width", "val_limit",
                 "synthia_val_frames", "val_batch_size"):
        flags.check_number(args, name, low=1)
    for name in ("warmup_iters", "weight_decay", "sfc_weight", "warmup_lr", "val_cache_gb"):
        flags.check_number(args, name, low=0)
    flags.check_number(args, "lr", low=0, low_open=True)
    flags.check_number(args, "scale", low=0, low_open=True)
    flags.check_number(args, "momentum", low=0, high=1, high_open=True)
    flags.check_number(args, "stop_after", low=-1)
    flags.check_number(args, "threads", low=1)
    flags.check_number(args, "progress_every", low=0, low_open=True)
    flags.check_ints(args, "layers", 1)
    flags.check_size(args, "source_size")
    flags.check_size(args, "target_size")
    flags.check_device(args.device)
    try:
        resolve_every(args.check_every, "cpu")
    except ValueError:
        raise flags.FlagError(f"--check-every {args.check_every}: expected a number >= 1 or "
                              "auto") from None


AUTO_WORKERS_CPU = 4  # --num-workers auto on the CPU (the workers share the cores with training)
AUTO_WORKERS_MAX = 8  # per loader: run 2's loaders needed 1-6 at its step times


def resolve_workers(value, device, target: bool) -> int:
    """`--num-workers N|auto` as a number (FlagError for anything else). auto: on the CPU 4 (at
    most the usable CPUs); on CUDA (usable CPUs / training processes on this node − 1) /
    training loaders, in [1, 8]. The processes on a node: torchrun's LOCAL_WORLD_SIZE times
    SFC_JOBS_PER_NODE (set by `SIDE_BY_SIDE=1 exp/pipeline.sh`, which runs two jobs at once).
    The workers change no number: the datasets have no randomness and each epoch's order is
    the sampler's."""
    if str(value) != "auto":
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0 or str(n) != str(value).strip():
            raise flags.FlagError(f"--num-workers {value}: expected a number >= 0 or auto")
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not str(dev).startswith("cuda"):
        return min(AUTO_WORKERS_CPU, cpus)
    procs = 1
    for var in ("LOCAL_WORLD_SIZE", "SFC_JOBS_PER_NODE"):
        try:
            procs *= max(1, int(os.environ.get(var, "1")))
        except ValueError:
            raise flags.FlagError(f"--num-workers auto: {var}={os.environ[var]!r} is not a "
                                  "number") from None
    loaders = 2 if target else 1
    return max(1, min(AUTO_WORKERS_MAX, (cpus // procs - 1) // loaders))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill stage/source-dependent defaults; check every flag and the inputs each stage needs
    (`sfc.flags.FlagError` names the flag)."""
    lr, wd, every = STAGE_DEFAULTS[args.stage]
    args.lr = lr if args.lr is None else args.lr
    args.weight_decay = wd if args.weight_decay is None else args.weight_decay
    args.eval_every = every if args.eval_every is None else args.eval_every
    if args.batch_size is None:
        args.batch_size = BATCH.get(args.stage, 1)
    if args.iters is None:  # the release's iterations for this stage and SFC weight (method §5)
        args.iters = ITERS[args.stage][args.sfc_weight > 0 and args.stage != "sfm"]
    validate(args)
    args.num_workers = resolve_workers(args.num_workers, args.device, args.sfc_weight > 0
                                       and args.stage != "sfm")
    args.num_classes = SOURCES[args.source]
    args.eval_ids = [int(i) for i in get_protocol(args.num_classes).eval_ids]
    if args.stage == "flownet":  # Flying Chairs: the files' own size unless asked
        args.source_size = list(args.source_size) if args.source_size else None
    else:
        args.source_size = list(args.source_size or SOURCE_SIZES[args.source])
    args.target_size = list(args.target_size)
    args.layers = list(args.layers)
    if args.warmup_order is None:
        args.warmup_order = "before" if args.sfc_weight > 0 else "after"
    if args.bn_control and (args.stage == "sfm" or args.sfc_weight <= 0):
        raise flags.FlagError("--bn-control applies to the SFC stages (--stage segnet or accel "
                              "with --sfc-weight > 0)")
    need = {"accel": ["update_ckpt", "reference_ckpt"], "sfm": ["flownet_ckpt"]}.get(
        args.stage, [])
    if args.sfc_weight > 0 and args.stage != "sfm" and not args.bn_control:
        need += ["flownet_ckpt", "sfm_ckpt"]
    missing = [n for n in need if getattr(args, n) is None]
    if missing:
        raise flags.FlagError(f"stage {args.stage} (sfc weight {args.sfc_weight}) needs "
                              + ", ".join("--" + m.replace("_", "-") for m in missing))
    if args.cuda_graph:  # what is known before the processes start (one process per rank)
        why = graphed.unsupported(args, args.device or ("cuda" if torch.cuda.is_available()
                                                        else "cpu"))
        if why is not None:
            raise flags.FlagError(why)
    if args.stage == "segnet" and args.imagenet_init is None:
        raise flags.FlagError("stage segnet needs --imagenet-init PATH (or 'none' for random "
                              "init)")
    if args.stage == "accel" and args.chairs_init is None:
        raise flags.FlagError("stage accel needs --chairs-init PATH (or 'none' for random "
                              "init)")
    return args


@dataclass
class Data:
    source: object
    target: object | None
    val: object
    protocol: object | None
    notes: tuple[str, ...] = ()  # lines for the run log (e.g. which val list is used)


def build_data(cfg) -> Data:
    c = cfg.num_classes
    if cfg.stage == "flownet":
        from sfc.data.flowsets import make_flow_set

        size = tuple(cfg.source_size) if cfg.source_size else None
        source = make_flow_set("flying_chairs", cfg.data, split="train", size=size)
        val = make_flow_set("flying_chairs", cfg.data, split="val", size=size)
        return Data(source, None, val, None,
                    notes=(f"Flying Chairs: {len(source)} train / {len(val)} val pairs under "
                           f"{Path(cfg.data) / 'FlyingChairs'}",))
    # Training clips travel as uint8 and are normalised on the device (sfc.train.streams.to_device):
    # the same tensors as the float path, less work in the workers.
    src_kw = {"frames": 2, "size": tuple(cfg.source_size), "list_file": cfg.source_list,
              "raw": True}
    protocol = get_protocol(c)
    if cfg.stage == "sfm":
        src_kw["prev_label"] = True
        if cfg.source == "synthia_seq":
            # No SYNTHIA-Seq source val split: hold out the last N annotated frames (docs).
            n = cfg.synthia_val_frames
            source = make_dataset("synthia_seq", cfg.data, split="train", holdout_val=True,
                                  val_frames=n, **src_kw)
            val = make_dataset("synthia_seq", cfg.data, split="val", val_frames=n,
                               frames=2, size=tuple(cfg.source_size), prev_label=True, raw=True)
            note = f"SFM val: the last {n} annotated SYNTHIA-Seq frames (held out)"
        else:
            source = make_dataset("viper", cfg.data, split="train", **src_kw)
            val_list, note = cfg.val_list, f"SFM val: --val-list {cfg.val_list}"
            if val_list is None:  # the release's 460-entry list where its frames exist
                val_list = release_val_list(Path(cfg.data) / DATASET_DIRS["viper"])
                note = (f"SFM val: the release's VIPER val list {val_list} (460 entries)"
                        if val_list else
                        "SFM val: the frames of the release's VIPER val list are not under "
                        f"{Path(cfg.data) / DATASET_DIRS['viper']} (a synthetic tree?); "
                        "using all annotated val frames instead")
            val = make_dataset("viper", cfg.data, split="val", frames=2, raw=True,
                               size=tuple(cfg.source_size), prev_label=True, list_file=val_list)
        return Data(source, None, val, None, notes=(note,))
    source = make_dataset(cfg.source, cfg.data, split="train", **src_kw)
    target = None
    if cfg.sfc_weight > 0:
        frames = 3 if cfg.stage == "accel" else 2  # SFC stage two: (t-2, t-1, t)
        target = make_dataset("cityscapes", cfg.data, split="train", frames=frames,
                              size=tuple(cfg.target_size), classes=c, raw=True)
    # validation clips raw too: kept so in memory by the validation cache (sfc.train.valcache)
    val = make_dataset("cityscapes", cfg.data, split="val", frames=2, raw=True,
                       size=tuple(cfg.target_size), classes=c, list_file=cfg.val_list)
    return Data(source, target, val, protocol)


def main(argv=None) -> int:
    """Train; returns the exit status. With `$SFC_STATUS_FILE` set, rank 0 also writes there
    why this attempt stopped (the run's `status.json` record, or one for an error before the
    run started): how the stage scripts pass the documented exit status through a launcher
    such as torchrun, which exits 1 whatever its workers did."""
    from sfc.train import engine
    from sfc.train.runio import RunDirError, WriteError

    engine.LAST_STATUS = None
    rc, message = 1, "crashed (see the traceback in the log)"
    try:
        args = build_parser().parse_args(argv)
        resolve(args)
        flags.check_writable_dir(args.out, "--out")
        rc, message = engine.train(args, build_data(args)), ""
        return rc
    except SystemExit as e:  # argparse: a bad flag (its message printed on rank 0)
        rc = e.code if isinstance(e.code, int) else 2
        message = "" if rc == 0 else "bad command-line flags"
        raise
    except (*flags.BAD_INPUT, RunDirError, WriteError) as e:
        # Bad input (a flag out of range; a missing dataset, earlier run or weight file; a
        # wrong checkpoint; a run directory in use or of another trajectory), or the data
        # error that stopped a run (last.pt saved): one clear line, not a traceback.
        rc, message = flags.report("sfc.train", e), flags.one_line(e)
        return rc
    finally:
        _status_file(rc, message)


def _status_file(rc: int, message: str) -> None:
    import os

    from sfc.train import engine, runio

    path = os.environ.get("SFC_STATUS_FILE")
    if not path or not flags.is_rank_zero():
        return
    rec = engine.LAST_STATUS
    if rec is None:
        reason = {0: "finished", 2: "bad_input"}.get(rc, "crashed")
        rec = runio.status_record(reason, rc, message=message)
    runio.write_status(path, rec)
