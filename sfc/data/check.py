"""Check a whole dataset before a long run: every clip's frames and labels are decoded.

    python -m sfc.data.check --dataset viper --root data             # data root or VIPER/ itself
    python -m sfc.data.check --dataset cityscapes --root data --split train --frames 3
    python -m sfc.data.check --dataset synthia_seq --root data --prev-label

Prints the number of clips that are OK, have a missing file, or have a broken file (unreadable,
truncated, wrong format, unknown ids, a label of another size than its frame), with the first
few examples — for Cityscapes also the snippets that have frames but no gtFine label (they
would never be evaluated) — and exits 1 if anything is wrong (2 if the tree itself cannot be
opened).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from sfc.data import DATASET_CLASSES, DATASET_DIRS, DatasetError

SPLITS = {"viper": "train", "cityscapes": "val", "synthia_seq": "train"}


def resolve_root(name: str, root) -> Path:
    """Accept the data root (``data/``) or the dataset folder itself (``data/VIPER``)."""
    root = Path(root)
    sub = root / DATASET_DIRS[name]
    return sub if sub.is_dir() else root


def check_dataset(name: str, root, split=None, frames=2, prev_label=False, list_file=None,
                  progress=True, examples=5) -> dict:
    """{"ok": n, "missing": [(name, msg)...], "broken": [...], "total": n}; raises
    DatasetError when the tree cannot be opened at all."""
    kwargs = dict(split=split or SPLITS[name], frames=frames, size=None, list_file=list_file)
    if prev_label:
        if name == "cityscapes":
            raise ValueError("--prev-label applies to viper and synthia_seq only")
        kwargs["prev_label"] = True
    ds = DATASET_CLASSES[name](resolve_root(name, root), **kwargs)
    report = {"ok": 0, "missing": [], "broken": [], "total": len(ds), "dataset": repr(ds),
              "unlabelled": []}
    if name == "cityscapes" and list_file is None:  # snippets with frames but no label
        report["unlabelled"] = ds.unlabelled_snippets()
    for i in tqdm(range(len(ds)), desc=f"checking {name}", disable=not progress):
        try:
            _check_sizes(ds[i], ds.items[i])
            report["ok"] += 1
        except DatasetError as e:
            kind = "missing" if str(e).startswith("missing") or ": missing" in str(e) else "broken"
            report[kind].append((str(ds.items[i]), str(e)))
    return report


def _check_sizes(item: dict, where) -> None:
    """At the files' own size, every label must cover its frame pixel for pixel (training
    resizes both to one size and would hide a mismatch)."""
    clip = item["seg"]  # (3, T, H, W)
    frame = tuple(clip.shape[-2:])
    for key in ("label", "label_prev"):
        if key in item and tuple(item[key].shape) != frame:
            h, w = item[key].shape
            raise DatasetError(f"{key.replace('_', ' ')} of {where} is {w}x{h}, its frame is "
                               f"{frame[1]}x{frame[0]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sfc.data.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASET_DIRS),
                   help="which dataset layout to check")
    p.add_argument("--root", required=True,
                   help="data root (with VIPER/, Cityscapes/, SynthiaSeq/) or the dataset folder")
    p.add_argument("--split", help="split to check (default: train; val for cityscapes)")
    p.add_argument("--frames", type=int, default=2, help="clip length to check (default 2)")
    p.add_argument("--prev-label", action="store_true",
                   help="also require the previous frame's label (the SFM stage)")
    p.add_argument("--list", dest="list_file", help="frame list file instead of scanning")
    p.add_argument("--examples", type=int, default=5, help="examples printed per problem kind")
    a = p.parse_args(argv)
    try:
        r = check_dataset(a.dataset, a.root, a.split, a.frames, a.prev_label, a.list_file)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(r["dataset"])
    print(f"clips: {r['total']}  ok: {r['ok']}  missing: {len(r['missing'])}  "
          f"broken: {len(r['broken'])}")
    for kind in ("missing", "broken"):
        for item, msg in r[kind][: a.examples]:
            print(f"  {kind}: {item}: {msg}")
    if r["unlabelled"]:
        print(f"snippets with frames but no gtFine label (never evaluated): "
              f"{len(r['unlabelled'])}, first {', '.join(r['unlabelled'][: a.examples])}")
    return 0 if r["ok"] == r["total"] and not r["unlabelled"] else 1


if __name__ == "__main__":
    sys.exit(main())
