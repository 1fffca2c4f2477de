"""``python -m sfc.evaluate``: score a checkpoint on Cityscapes-Seq val (method §6).

Single process: ``python -m sfc.evaluate --checkpoint CKPT --data DATA_ROOT``.
Several GPUs: ``torchrun --nproc_per_node=4 -m sfc.evaluate ...`` — each process scores a
disjoint shard (``ShardSampler``) and the confusion matrices are summed (exact).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from sfc import dist, flags
from sfc.data.flowsets import FLOW_SETS
from sfc.evaluate.checkpoint import (
    FLOW_NETWORKS,
    SOURCE_CLASSES,
    build_model,
    check_classes,
    inspect_checkpoint,
    load_flownet,
    resolve_run,
)
from sfc.evaluate.core import evaluate_accel, evaluate_segnet
from sfc.evaluate.data import NativeLabels, make_eval_loader
from sfc.evaluate.metrics import format_table, metrics_record, write_csv, write_json
from sfc.evaluate.temporal import (
    CONVENTIONS,
    evaluate_streaming_tc,
    evaluate_temporal_consistency,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sfc.evaluate",
        description="Per-class IoU and mIoU of an Accel or single-frame SegNet checkpoint on "
                    "Cityscapes-Seq val (method §6). Under torchrun the val set is sharded.")
    p.add_argument("--checkpoint", required=True,
                   help="this project's best.pt/last.pt or run directory (its best.pt), the "
                        "release's Accel state dict (SFC stage two best.pth) or a release "
                        "stage-one SegNet; --flow: any FlowNetS")
    p.add_argument("--data", default=os.environ.get("SFC_DATA", "data"),
                   help="data root containing Cityscapes/ (default: $SFC_DATA or data/)")
    p.add_argument("--source", choices=sorted(SOURCE_CLASSES), default=None,
                   help="benchmark: viper (15 classes) or synthia_seq (12 trained, 11 "
                        "evaluated); default: the run config's source, else viper")
    p.add_argument("--protocol", choices=("release", "full"), default="release",
                   help="release: labels resized (nearest) to the input size (1024x512); "
                        "full: logits upsampled to the native 2048x1024 labels (DA-VSN/TPS)")
    p.add_argument("--mode", choices=("accel", "segnet"), default=None,
                   help="accel: clip (f-1, f); segnet: single frame f, main head "
                        "(default: from the checkpoint)")
    p.add_argument("--split", default=None,
                   help="split (default: val; --flow: the flow set's, e.g. train for VIPER)")
    p.add_argument("--list", dest="list_file", default=None,
                   help="optional list file of frames to evaluate (default: scan gtFine)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="network input size (default: the checkpoint's training size, else "
                        "1024 512; --flow: the stage's size of "
                        "the flow set — VIPER 1280 720, synthetic target 1024 512 — or the "
                        "files' own)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N images (smoke tests)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available; under torchrun "
                        "cuda:LOCAL_RANK)")
    p.add_argument("--layers", type=int, nargs=4, default=None, metavar=("L1", "L2", "L3", "L4"),
                   help="ResNet blocks per layer (default: read from the checkpoint)")
    p.add_argument("--width", type=int, default=None,
                   help="ResNet stem width (default: read from the checkpoint)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per batch (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default: 2)")
    p.add_argument("--amp", choices=("bf16",), default=None,
                   help="autocast dtype on CUDA (default: float32)")
    p.add_argument("--json", default=None, help="write the result as JSON (fractions) here")
    p.add_argument("--csv", default=None, help="write the per-class table as CSV here")
    p.add_argument("--save-pred", default=None, metavar="DIR",
                   help="write colourised predictions as DIR/<name>.png")
    p.add_argument("--keyframe-distance", type=int, nargs="+", default=None, metavar="D",
                   help="Accel: one evaluation per keyframe distance D, the keyframe D frames "
                        "before the labelled frame (the clip of D+1 frames ending at it: the "
                        "output sfc.predict gives a frame D frames after its keyframe; 1 = the "
                        "paper's protocol, the default; the real snippets allow D <= 19)")
    p.add_argument("--keyframe-interval", dest="keyframe_distance_deprecated", type=int,
                   nargs="+", default=None, metavar="D",
                   help="deprecated name of --keyframe-distance (an *interval* is a period, "
                        "what sfc.predict --keyframe-interval means)")
    p.add_argument("--temporal-consistency", action="store_true",
                   help="also measure temporal consistency (TC): the mIoU between the "
                        "prediction at t and the prediction at t-1 warped to t, over the last "
                        "--tc-pairs frame pairs of each val snippet, flow from --tc-flownet")
    p.add_argument("--tc-flow", choices=("flownet", "gt"), default="flownet",
                   help="the flow that judges TC: 'gt', the ground-truth flow of the val set "
                        "(the synthetic target has it: an independent judge); 'flownet', the "
                        "FlowNetS of --tc-flownet")
    p.add_argument("--tc-flownet", default=None, metavar="CKPT",
                   help="the FlowNetS that judges TC for every model: best one that no "
                        "compared model trained against (a Flying-Chairs run or the release's "
                        "flownet_flyingchairs_pretrained.pth), not flownet_global; a file "
                        "holding several takes its optical-flow FlowNet, never the SFM")
    p.add_argument("--flow", action="store_true",
                   help="evaluate optical flow instead: EPE, Fl-all and the zero-flow baseline "
                        "of the FlowNetS in --checkpoint on --flow-set")
    p.add_argument("--flow-set", choices=FLOW_SETS, default=None,
                   help="--flow: flying_chairs (DATA/FlyingChairs), viper (VIPER/<split>/flow, "
                        "train by default), synthetic_target (Cityscapes/flow_synthetic, the "
                        "synthetic tree only) or middlebury_stereo (real photographs, needs "
                        "scikit-image)")
    p.add_argument("--flow-network", choices=FLOW_NETWORKS, default=None,
                   help="--flow: which FlowNetS of a file holding several (default: the "
                        "optical-flow FlowNet, else flownet_global; the SFM only if named)")
    p.add_argument("--tc-keyframe-interval", type=int, nargs="+", default=None, metavar="N",
                   help="Accel: also TC as deployed, per keyframe interval N (a period): the "
                        "streaming Accel of sfc.predict runs through each snippet's frames up "
                        "to the labelled one and TC counts all consecutive pairs, so switches "
                        "at keyframes count (needs --temporal-consistency)")
    p.add_argument("--tc-pairs", type=int, default=None,
                   help="frame pairs per snippet for TC, ending at the labelled frame (default 5;"
                        " not with --tc-convention liu, which takes them all)")
    p.add_argument("--tc-convention", choices=CONVENTIONS, default="sfc",
                   help="sfc: the pairs above, the mean over classes present in either map; "
                        "liu: Liu et al.'s (ECCV 2020, as DA-VSN and TPS publish it) - all "
                        "29 pairs of each 30-frame snippet, the mean over all evaluated classes "
                        "with absent ones counting 0 (default sfc)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


MAX_KEYFRAME_DISTANCE = 19  # a real snippet holds 19 frames before the labelled one
SNIPPET_AFTER_LABEL = 10  # ... and 10 after it (30 frames, the 20th labelled)


def _safe_name(name, i: int) -> str:
    name = str(name) if name is not None else f"img{i:05d}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class _PredWriter:
    def __init__(self, out_dir: str, palette: np.ndarray):
        from PIL import Image

        from sfc.vis import colorize

        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.palette, self.colorize, self.Image = palette, colorize, Image
        self.count = 0

    def __call__(self, names, pred: torch.Tensor) -> None:
        for name, p in zip(names, pred):  # p: (h, w) train ids
            rgb = self.colorize(p, self.palette)  # (h, w, 3) uint8
            self.Image.fromarray(rgb).save(self.dir / f"{_safe_name(name, self.count)}.png")
            self.count += 1


def validate(args) -> None:
    """Every numeric and device flag, and the outputs' writability, before any work."""
    old = getattr(args, "keyframe_distance_deprecated", None)
    if old is not None:
        if args.keyframe_distance is not None:
            raise flags.FlagError("--keyframe-interval is the deprecated name of "
                                  "--keyframe-distance: give one of them")
        print("warning: sfc.evaluate --keyframe-interval is deprecated: it is the keyframe "
              "*distance* here; use --keyframe-distance", file=sys.stderr)
        args.keyframe_distance = old
    if args.keyframe_distance is None:
        args.keyframe_distance = [1]
    flags.check_number(args, "limit", low=1)
    flags.check_number(args, "batch_size", low=1)
    flags.check_number(args, "workers", low=0)
    flags.check_number(args, "width", low=1)
    flags.check_ints(args, "layers", 1)
    flags.check_size(args, "size")
    flags.check_device(args.device)
    flags.check_ints(args, "keyframe_distance", 1)
    if max(args.keyframe_distance) > MAX_KEYFRAME_DISTANCE:
        raise flags.FlagError(f"--keyframe-distance {max(args.keyframe_distance)}: at most "
                              f"{MAX_KEYFRAME_DISTANCE} (the snippets hold 19 frames before the "
                              "labelled one)")
    flags.check_number(args, "tc_pairs", low=1)
    if args.tc_convention == "liu" and args.tc_pairs is not None:
        raise flags.FlagError("--tc-pairs does not apply to --tc-convention liu (it counts all "
                              "pairs of each snippet)")
    if args.tc_pairs is None and args.tc_convention == "sfc":
        args.tc_pairs = 5
    if args.flow and args.flow_set is None:
        raise flags.FlagError("--flow needs --flow-set (" + ", ".join(FLOW_SETS) + ")")
    if args.flow and (args.temporal_consistency or args.keyframe_distance != [1]
                      or args.save_pred):
        raise flags.FlagError("--flow evaluates a FlowNetS alone; --temporal-consistency, "
                              "--keyframe-distance and --save-pred apply to segmentation")
    flags.check_ints(args, "tc_keyframe_interval", 1)
    if args.tc_keyframe_interval and not args.temporal_consistency:
        raise flags.FlagError("--tc-keyframe-interval needs --temporal-consistency")
    if args.temporal_consistency and args.tc_flow == "flownet" and args.tc_flownet is None:
        raise flags.FlagError("--temporal-consistency needs --tc-flow gt (ground-truth flow "
                              "of the val set) or --tc-flownet CKPT (the FlowNetS that "
                              "judges every model, e.g. a Flying-Chairs run)")
    k_max = max(args.keyframe_distance)
    pairs = args.tc_pairs or 0
    if args.temporal_consistency and k_max + pairs > MAX_KEYFRAME_DISTANCE:
        raise flags.FlagError(f"--tc-pairs {args.tc_pairs} with --keyframe-distance {k_max} "
                              "needs more than the 19 frames before the labelled one")
    for name in ("json", "csv"):
        if getattr(args, name):
            flags.check_writable_file(getattr(args, name), f"--{name}")
    if args.save_pred:
        flags.check_writable_dir(args.save_pred, "--save-pred")


def warn_size(info, size, out=None) -> None:
    """Say so when the input size differs from the one the checkpoint was trained at."""
    trained = info.config.get("target_size")
    if trained and list(trained) != list(size):
        print(f"warning: {info.path} was trained at {trained[0]}x{trained[1]} (target size), "
              f"evaluating at {size[0]}x{size[1]} (--size)", file=out or sys.stderr)


def run(args) -> dict | None:
    """Evaluate; returns the JSON record on rank 0 (None elsewhere)."""
    from sfc.data import DATASET_DIRS, CityscapesSeq
    from sfc.data.classes import get_protocol

    validate(args)
    info_d = dist.init_distributed(args.device)
    device = info_d.device
    if args.flow:
        return _run_flow(args, device)
    args.split = args.split or "val"
    info = inspect_checkpoint(resolve_run(args.checkpoint), args.mode)
    # --size: given, else the size the checkpoint was trained at (as sfc.predict), else the
    # release's 1024x512
    args.size = list(args.size or info.config.get("target_size") or (1024, 512))
    source = args.source or info.config.get("source") or "viper"
    check_classes(info, source)
    if dist.is_main():
        warn_size(info, args.size)
    protocol = get_protocol(SOURCE_CLASSES[source])

    if info.mode != "accel" and args.keyframe_distance != [1]:
        raise flags.FlagError(f"--keyframe-distance applies to Accel checkpoints; {info.path} "
                              "is a single-frame SegNet")
    root = Path(args.data) / DATASET_DIRS["cityscapes"]

    def loader_of(frames: int, limit=args.limit, gt_flow: bool = False, after: int = 0):
        ds = CityscapesSeq(root, split=args.split, frames=frames, size=tuple(args.size),
                           classes=protocol.num_classes, list_file=args.list_file,
                           gt_flow=gt_flow, after=after)
        if args.protocol == "full":
            ds = NativeLabels(ds)
        if limit is not None:
            ds = Subset(ds, range(min(limit, len(ds))))
        return make_eval_loader(ds, batch_size=args.batch_size, num_workers=args.workers,
                                pin_memory=device.type == "cuda")

    unlabelled = []
    if args.list_file is None:  # snippets with frames but no label are not evaluated: say so
        unlabelled = CityscapesSeq(root, split=args.split, frames=1, size=None,
                                   classes=protocol.num_classes).unlabelled_snippets()
        if unlabelled and dist.is_main():
            print(f"warning: {len(unlabelled)} {args.split} snippets under {root} have frames "
                  f"but no gtFine label and are not evaluated (first: "
                  f"{', '.join(unlabelled[:3])}); python -m sfc.data.check lists them",
                  file=sys.stderr)
    model = build_model(info, args.layers, args.width).to(device)
    tc_net, tc_judge = None, None
    if args.temporal_consistency:
        if args.tc_flow == "gt":
            tc_net, tc_judge = "gt", "ground-truth flow of the val set"
        else:
            tc_net, tc_judge = load_flownet(args.tc_flownet)
            tc_net = tc_net.to(device)
    liu = args.tc_convention == "liu"

    def tc_loader(frames: int):
        """Clips for TC: `frames` up to the labelled one, or (liu) the whole snippet."""
        if liu:
            return loader_of(MAX_KEYFRAME_DISTANCE + 1, gt_flow=tc_net == "gt",
                             after=SNIPPET_AFTER_LABEL)
        return loader_of(frames, gt_flow=tc_net == "gt")

    hook = _PredWriter(args.save_pred, protocol.palette) if args.save_pred else None
    per_k = []
    for i, k in enumerate(args.keyframe_distance):
        if info.mode == "accel":
            res = evaluate_accel(model, loader_of(k + 1), protocol.num_classes,
                                 protocol.eval_ids, device=device, protocol=args.protocol,
                                 progress=not args.no_progress, amp=args.amp,
                                 pred_hook=hook if i == 0 else None, keyframe_distance=k)
        else:
            res = evaluate_segnet(model, loader_of(2), protocol.num_classes, protocol.eval_ids,
                                  device=device, protocol=args.protocol,
                                  progress=not args.no_progress, amp=args.amp, pred_hook=hook)
        if tc_net is not None:
            res["tc"] = evaluate_temporal_consistency(
                model, info.mode, tc_loader((args.tc_pairs or 0) + k + 1), tc_net,
                protocol.num_classes, protocol.eval_ids, pairs=None if liu else args.tc_pairs,
                keyframe_distance=k, device=device, progress=not args.no_progress,
                convention=args.tc_convention)
        per_k.append((k, res))
    streaming = []
    if tc_net is not None and info.mode == "accel":
        for n in args.tc_keyframe_interval or []:  # TC as deployed: the streaming Accel
            streaming.append(evaluate_streaming_tc(
                model, tc_loader(MAX_KEYFRAME_DISTANCE + 1), tc_net, protocol.num_classes,
                protocol.eval_ids, n, device=device, progress=not args.no_progress,
                convention=args.tc_convention))
    elif args.tc_keyframe_interval and info.mode != "accel":
        raise flags.FlagError(f"--tc-keyframe-interval applies to Accel checkpoints; "
                              f"{info.path} is a single-frame SegNet")
    record = None
    if dist.is_main():
        k0, res = per_k[0]
        record = metrics_record(
            res["per_class"], res["miou"], protocol.class_names, protocol.eval_ids,
            num_images=res["num_images"], protocol=args.protocol,
            checkpoint=os.fspath(args.checkpoint),
            checkpoint_format=info.fmt, checkpoint_which=info.meta.get("which"),
            iteration=info.meta.get("iteration"), mode=info.mode, source=source,
            class_protocol=protocol.name, input_size=list(args.size),
            world_size=info_d.world_size, keyframe_distance=k0,
        )
        record["snippets_without_label"] = len(unlabelled)
        if len(per_k) > 1 or k0 != 1 or tc_net is not None:
            record["keyframe_distances"] = [_k_record(k, r, protocol) for k, r in per_k]
        if tc_net is not None:
            record["temporal_consistency"] = record["keyframe_distances"][0]["tc"]
            record["tc_flow"] = args.tc_flow
            record["tc_judge"] = tc_judge
            record["tc_convention"] = args.tc_convention
            if args.tc_flow == "flownet":
                record["tc_flownet"] = os.fspath(args.tc_flownet)
        if streaming:
            names, ids = protocol.class_names, list(protocol.eval_ids)
            record["tc_streaming"] = [
                {k: v for k, v in r.items() if k != "per_class"}
                | {"per_class": {names[i]: r["per_class"][i] for i in ids}} for r in streaming]
        print(format_table(record))
        for r in streaming:
            print(f"TC as deployed, keyframe interval {r['keyframe_interval']}: "
                  f"{100 * r['tc']:.2f} % over all {r['pairs']} consecutive pairs of "
                  f"{r['num_snippets']} snippets (streaming Accel)")
        if tc_judge is not None:
            print(f"TC judged by: {tc_judge}; convention: " + (
                "Liu et al.'s (all pairs of each 30-frame snippet, mean over all classes)"
                if liu else "the last pairs up to the labelled frame, mean over the classes "
                            "present"))
        if args.json:
            write_json(args.json, record)
            print(f"wrote {args.json}")
        if args.csv:
            write_csv(args.csv, record)
            print(f"wrote {args.csv}")
        if hook is not None:
            print(f"colourised predictions in {args.save_pred}")
    dist.barrier()
    return record


def _run_flow(args, device) -> dict | None:
    from sfc.evaluate.flow import format_flow_table, run_flow, write_flow_csv

    record = run_flow(args, device)
    if dist.is_main():
        print(format_flow_table(record))
        if args.json:
            write_json(args.json, record)
            print(f"wrote {args.json}")
        if args.csv:
            write_flow_csv(args.csv, [record])
            print(f"wrote {args.csv}")
    dist.barrier()
    return record if dist.is_main() else None


def _k_record(k: int, res: dict, protocol) -> dict:
    names, ids = protocol.class_names, list(protocol.eval_ids)
    rec = {"keyframe_distance": k, "miou": float(res["miou"]),
           "per_class": {names[i]: float(res["per_class"][i]) for i in ids},
           "num_images": res["num_images"]}
    if "tc" in res:
        tc = res["tc"]
        rec["tc"] = {"tc": tc["tc"], "pairs": tc["pairs"], "num_snippets": tc["num_snippets"],
                     "convention": tc["convention"],
                     "per_class": {names[i]: tc["per_class"][i] for i in ids}}
    return rec


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except flags.BAD_INPUT as e:
        # Bad input: one readable line naming the file and what was expected, no traceback.
        parser.exit(2, f"{parser.prog}: error: {flags.one_line(e)}\n")
    finally:
        dist.cleanup()
    return 0
