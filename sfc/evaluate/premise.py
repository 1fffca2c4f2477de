"""``python -m sfc.evaluate.premise``: SFC's premise, measured (docs/flow.md).

SFC assumes that optical flow transfers from the source domain to the target far better than
segmentation does. This command puts side by side, for the same models:

* each FlowNetS's EPE (and the zero-flow baseline) on the source's ground-truth flow (VIPER's
  ``flow/``) and on the target's (the synthetic target's ``flow_synthetic/``; real Cityscapes
  has none), and optionally on real photographs (``--real-pair``: Middlebury's motorcycle);
* each SegNet's mIoU on source val and on target val.

The premise holds where the flow error ratio target / source is close to 1 while the mIoU drops
from source to target. Example (the demo runs this)::

    python -m sfc.evaluate.premise --data data --flownet RUNS/FlowNet_chairs/train \\
        --flownet RUNS/FlowNet_pretrain/stage_two/train \\
        --segnet RUNS/FlowNet_pretrain/stage_one/update \\
        --source-size 1280 720 --target-size 1024 512 --json premise.json

A set without ground truth is reported as missing ("—"), not guessed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from sfc import flags
from sfc.data import DatasetError, get_protocol, make_dataset
from sfc.data.flowsets import make_flow_set
from sfc.evaluate.checkpoint import (
    SOURCE_CLASSES,
    build_model,
    check_classes,
    inspect_checkpoint,
    load_flownet,
    resolve_run,
)
from sfc.evaluate.core import evaluate_segnet
from sfc.evaluate.data import make_eval_loader
from sfc.evaluate.flow import evaluate_flow


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sfc.evaluate.premise",
                                description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.environ.get("SFC_DATA", "data"), help="data root")
    p.add_argument("--source", choices=sorted(SOURCE_CLASSES), default="viper",
                   help="source domain (SYNTHIA-Seq has no ground-truth flow: flow on the "
                        "source is then missing)")
    p.add_argument("--flownet", action="append", default=[], metavar="CKPT",
                   help="a FlowNetS (file or run directory; repeatable): Flying-Chairs, "
                        "FlowNet_pretrain stage two, a release .pth")
    p.add_argument("--segnet", action="append", default=[], metavar="CKPT",
                   help="a single-frame SegNet (stage-one run or file; repeatable)")
    p.add_argument("--source-size", type=int, nargs=2, metavar=("W", "H"), default=(1280, 720),
                   help="source evaluation size (the stages')")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("W", "H"), default=(1024, 512),
                   help="target evaluation size (the stages')")
    p.add_argument("--source-flow-split", default="val",
                   help="VIPER split whose flow/ is used (val: frames no stage trained on)")
    p.add_argument("--real-pair", action="store_true",
                   help="also the FlowNets on Middlebury's motorcycle stereo pair (real "
                        "photographs; needs scikit-image), at --real-size")
    p.add_argument("--real-size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="size for --real-pair (default: its own 741x500)")
    p.add_argument("--synthia-val-frames", type=int, default=50,
                   help="SYNTHIA-Seq source val: the last N annotated frames (as the SFM stage)")
    p.add_argument("--limit", type=int, default=None, help="at most N pairs / images per set")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--workers", type=int, default=0, help="data loader workers")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def short_name(path) -> str:
    """A run checkpoint's run (``…/FlowNet_pretrain/stage_two/train/best.pt`` →
    ``FlowNet_pretrain/stage_two/train``), else the file name."""
    p = Path(path)
    if p.name in ("best.pt", "last.pt"):
        p = p.parent
    if (p / "config.json").is_file() or p.is_dir():
        parts = p.parts[-3:]
        return "/".join(parts[1:] if parts and parts[0] in ("viper", "synthia_seq") else parts)
    return p.name


def _loader(ds, limit, workers):
    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))
    return make_eval_loader(ds, batch_size=1, num_workers=workers)


def _flow_sets(a) -> dict:
    """{domain: (flow set, split, size)} that have ground truth here; others map to a reason."""
    sets = {}
    if a.source == "viper":
        sets["source"] = ("viper", a.source_flow_split, tuple(a.source_size))
    else:
        sets["source"] = "SYNTHIA-Seq has no ground-truth flow"
    sets["target"] = ("synthetic_target", "val", tuple(a.target_size))
    if a.real_pair:
        sets["real"] = ("middlebury_stereo", "all", tuple(a.real_size) if a.real_size else None)
    return sets


def run(a) -> dict:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record = {"source": a.source, "flownets": [], "segnets": [],
              "units": {"epe": "pixels of the evaluated size", "miou": "fraction"}}
    sets = _flow_sets(a)
    for ckpt in a.flownet:
        net, which = load_flownet(ckpt)
        row = {"checkpoint": str(ckpt), "network": which,
               "label": f"{short_name(ckpt)} [{which.split(' ', 1)[0]}]"}
        for dom, spec in sets.items():
            if isinstance(spec, str):
                row[dom] = {"missing": spec}
                continue
            name, split, size = spec
            try:
                ds = make_flow_set(name, a.data, split=split, size=size)
            except DatasetError as e:
                row[dom] = {"missing": str(e)}
                continue
            res = evaluate_flow(net.to(device), _loader(ds, a.limit, a.workers), device=device,
                                progress=not a.no_progress)
            row[dom] = {"flow_set": name, "split": split, "size": list(size) if size else None,
                        **res}
        s, t = row.get("source", {}), row.get("target", {})
        if "epe" in s and "epe" in t:
            row["epe_ratio_target_source"] = t["epe"] / max(s["epe"], 1e-12)
            row["relative_epe_ratio"] = ((t["epe"] / max(t["epe_zero"], 1e-12))
                                         / max(s["epe"] / max(s["epe_zero"], 1e-12), 1e-12))
        record["flownets"].append(row)
    protocol = get_protocol(SOURCE_CLASSES[a.source])
    for ckpt in a.segnet:
        info = inspect_checkpoint(resolve_run(ckpt), "segnet")
        check_classes(info, a.source)
        model = build_model(info).to(device)
        if a.source == "viper":
            src = make_dataset("viper", a.data, split="val", frames=1,
                               size=tuple(a.source_size))
        else:
            src = make_dataset("synthia_seq", a.data, split="val", frames=1,
                               size=tuple(a.source_size), val_frames=a.synthia_val_frames)
        tgt = make_dataset("cityscapes", a.data, split="val", frames=1,
                           size=tuple(a.target_size), classes=protocol.num_classes)
        row = {"checkpoint": str(ckpt), "label": short_name(ckpt)}
        for dom, ds in (("source", src), ("target", tgt)):
            res = evaluate_segnet(model, _loader(ds, a.limit, a.workers), protocol.num_classes,
                                  protocol.eval_ids, device=device, progress=not a.no_progress)
            row[dom] = {"miou": float(res["miou"]), "num_images": res["num_images"]}
        row["miou_drop"] = row["source"]["miou"] - row["target"]["miou"]
        record["segnets"].append(row)
    return record


def _f(d: dict, key: str, fmt: str) -> str:
    return fmt.format(d[key]) if key in d else "—"


def format_premise(rec: dict) -> str:
    out = ["SFC's premise: flow error across domains vs segmentation accuracy across domains",
           f"{'FlowNetS':<50}{'EPE src':>9}{'zero src':>9}{'EPE tgt':>9}{'zero tgt':>9}"
           f"{'tgt/src':>9}{'EPE real':>10}{'zero real':>10}"]
    for r in rec["flownets"]:
        s, t, real = r.get("source", {}), r.get("target", {}), r.get("real", {})
        ratio = f"{r['epe_ratio_target_source']:.2f}" if "epe_ratio_target_source" in r else "—"
        out.append(f"{r['label'][:49]:<50}{_f(s, 'epe', '{:.3f}'):>9}"
                   f"{_f(s, 'epe_zero', '{:.3f}'):>9}{_f(t, 'epe', '{:.3f}'):>9}"
                   f"{_f(t, 'epe_zero', '{:.3f}'):>9}{ratio:>9}{_f(real, 'epe', '{:.3f}'):>10}"
                   f"{_f(real, 'epe_zero', '{:.3f}'):>10}")
    if rec["segnets"]:
        out += ["", f"{'SegNet':<50}{'mIoU src':>10}{'mIoU tgt':>10}{'drop':>8}"]
        for r in rec["segnets"]:
            out.append(f"{r['label'][:49]:<50}{100 * r['source']['miou']:>10.1f}"
                       f"{100 * r['target']['miou']:>10.1f}{100 * r['miou_drop']:>8.1f}")
    out.append("EPE in pixels of the evaluated size; mIoU in %. The premise holds where "
               "tgt/src is near 1 while the mIoU drops.")
    return "\n".join(out)


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        if not a.flownet and not a.segnet:
            raise flags.FlagError("give at least one --flownet or --segnet")
        for name in ("source_size", "target_size", "real_size"):
            flags.check_size(a, name)
        flags.check_number(a, "limit", low=1)
        flags.check_device(a.device)
        if a.json:
            flags.check_writable_file(a.json, "--json")
        rec = run(a)
    except flags.BAD_INPUT as e:
        return flags.report("sfc.evaluate.premise", e)
    print(format_premise(rec))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rec, indent=2) + "\n")
        print(f"wrote {a.json}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
