"""``python -m sfc.evaluate``: score a checkpoint on Cityscapes-Seq val (SPEC §6).

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
from sfc.checkpoints import CheckpointFormatError
from sfc.data.io import DatasetError
from sfc.evaluate.checkpoint import SOURCE_CLASSES, build_model, check_classes, inspect_checkpoint
from sfc.evaluate.core import evaluate_accel, evaluate_segnet
from sfc.evaluate.data import NativeLabels, make_eval_loader
from sfc.evaluate.metrics import format_table, metrics_record, write_csv, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sfc.evaluate",
        description="Per-class IoU and mIoU of an Accel or single-frame SegNet checkpoint on "
                    "Cityscapes-Seq val (SPEC §6). Under torchrun the val set is sharded.")
    p.add_argument("--checkpoint", required=True,
                   help="this project's best.pt/last.pt, the release's Accel state dict "
                        "(SFC stage two best.pth) or a release stage-one SegNet")
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
    p.add_argument("--split", default="val", help="Cityscapes split (default: val)")
    p.add_argument("--list", dest="list_file", default=None,
                   help="optional list file of frames to evaluate (default: scan gtFine)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=(1024, 512),
                   help="network input size (default: 1024 512)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


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
    flags.check_number(args, "limit", low=1)
    flags.check_number(args, "batch_size", low=1)
    flags.check_number(args, "workers", low=0)
    flags.check_number(args, "width", low=1)
    flags.check_ints(args, "layers", 1)
    flags.check_size(args, "size")
    flags.check_device(args.device)
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
    info = inspect_checkpoint(args.checkpoint, args.mode)
    source = args.source or info.config.get("source") or "viper"
    check_classes(info, source)
    if dist.is_main():
        warn_size(info, args.size)
    protocol = get_protocol(SOURCE_CLASSES[source])

    dataset = CityscapesSeq(Path(args.data) / DATASET_DIRS["cityscapes"], split=args.split,
                            frames=2, size=tuple(args.size), classes=protocol.num_classes,
                            list_file=args.list_file)
    if args.protocol == "full":
        dataset = NativeLabels(dataset)
    if args.limit is not None:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = make_eval_loader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                              pin_memory=device.type == "cuda")

    model = build_model(info, args.layers, args.width).to(device)
    hook = _PredWriter(args.save_pred, protocol.palette) if args.save_pred else None
    evaluate = evaluate_accel if info.mode == "accel" else evaluate_segnet
    res = evaluate(model, loader, protocol.num_classes, protocol.eval_ids, device=device,
                   protocol=args.protocol, progress=not args.no_progress, amp=args.amp,
                   pred_hook=hook)
    record = None
    if dist.is_main():
        record = metrics_record(
            res["per_class"], res["miou"], protocol.class_names, protocol.eval_ids,
            num_images=res["num_images"], protocol=args.protocol,
            checkpoint=os.fspath(args.checkpoint),
            checkpoint_format=info.fmt, checkpoint_which=info.meta.get("which"),
            iteration=info.meta.get("iteration"), mode=info.mode, source=source,
            class_protocol=protocol.name, input_size=list(args.size),
            world_size=info_d.world_size,
        )
        print(format_table(record))
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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (flags.FlagError, CheckpointFormatError, DatasetError, FileNotFoundError) as e:
        # Bad input: one readable line naming the file and what was expected, no traceback.
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    finally:
        dist.cleanup()
    return 0
