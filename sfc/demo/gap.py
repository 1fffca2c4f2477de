"""Measure the synthetic domain gap: train a tiny DeepLab-v2 on a synthetic source, evaluate
mIoU on the source's val split and on Cityscapes val (the target). Results go in docs/data.md.

    python -m sfc.data.synthetic --out /tmp/syn
    python -m sfc.demo.gap --data /tmp/syn [--iters 300] [--oracle]

``--oracle`` also trains the same model on the synthetic Cityscapes train split (target labels):
the gap between that and the source model is due to appearance, not to a harder target.
This is a property of the data, not the paper's recipe: Adam (lr 1e-3), batch 4, no ImageNet
init, single frames (the last frame of each clip), images at half the files' size (``--scale``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sfc.data import get_protocol, make_dataset
from sfc.evaluate.metrics import confusion_matrix, iou_from_confusion
from sfc.models import DeepLabV2


def load_frames(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """All items' annotated frames: (N, 3, H, W) SegNet input, (N, H, W) train ids."""
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["seg"][:, -1] for it in items])
    return x, torch.stack([it["label"] for it in items])


def train(x, y, num_classes, iters, batch=4, seed=0, desc="train") -> DeepLabV2:
    torch.manual_seed(seed)
    model = DeepLabV2(num_classes=num_classes, layers=(1, 1, 1, 1), width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(iters), desc=desc):
        idx = torch.randint(len(x), (batch,), generator=g)
        logits = F.interpolate(model(x[idx]), size=y.shape[-2:], mode="bilinear",
                               align_corners=False)
        loss = F.cross_entropy(logits, y[idx], ignore_index=-1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def miou(model, x, y, protocol) -> float:
    cm = torch.zeros(protocol.num_classes, protocol.num_classes, dtype=torch.long)
    for i in range(0, len(x), 8):
        logits = F.interpolate(model(x[i:i + 8]), size=y.shape[-2:], mode="bilinear",
                               align_corners=False)
        cm += confusion_matrix(logits.argmax(1), y[i:i + 8], protocol.num_classes)
    return 100.0 * iou_from_confusion(cm, protocol.eval_ids)[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sfc.demo.gap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="synthetic data root")
    p.add_argument("--source", choices=("viper", "synthia_seq"), default="viper",
                   help="source domain (viper: 15 classes, synthia_seq: 12 / 11 evaluated)")
    p.add_argument("--iters", type=int, default=400, help="training iterations")
    p.add_argument("--seed", type=int, default=0, help="torch seed")
    p.add_argument("--oracle", action="store_true", help="also train on Cityscapes train")
    p.add_argument("--scale", type=float, default=0.5,
                   help="resize factor applied to the files' size (default 0.5: 128×72 etc.)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for this tiny model on a busy machine)")
    a = p.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(a.threads)
    classes = 15 if a.source == "viper" else 12
    protocol = get_protocol(classes)
    src_kw, tgt_kw = dict(frames=1), dict(frames=1, classes=classes)
    for name, kw in ((a.source, src_kw), ("cityscapes", tgt_kw)):
        h, w = make_dataset(name, a.data, frames=1, size=None)[0]["label"].shape
        kw["size"] = (round(w * a.scale), round(h * a.scale))
    if a.source == "viper":
        src = make_dataset("viper", a.data, split="train", **src_kw)
        src_val = make_dataset("viper", a.data, split="val", **src_kw)
    else:  # SYNTHIA-Seq has no val split: hold out its last frames
        src = make_dataset("synthia_seq", a.data, holdout_val=True, val_frames=10, **src_kw)
        src_val = make_dataset("synthia_seq", a.data, split="val", val_frames=10, **src_kw)
    tgt_val = make_dataset("cityscapes", a.data, split="val", **tgt_kw)
    xs, ys = load_frames(src)
    rows = []
    model = train(xs, ys, classes, a.iters, seed=a.seed, desc=f"train on {a.source}")
    rows.append((a.source, miou(model, *load_frames(src_val), protocol),
                 miou(model, *load_frames(tgt_val), protocol)))
    if a.oracle:
        tgt = make_dataset("cityscapes", a.data, split="train", **tgt_kw)
        model = train(*load_frames(tgt), classes, a.iters, seed=a.seed, desc="train on cityscapes")
        rows.append(("cityscapes (oracle)", float("nan"),
                     miou(model, *load_frames(tgt_val), protocol)))
    print(f"\nprotocol {protocol.name}, {a.iters} iterations, source {src_kw['size']}, "
          f"target {tgt_kw['size']}, {time.time() - t0:.0f} s")
    print("| trained on | mIoU source val | mIoU Cityscapes val |\n|---|---|---|")
    for name, s, t in rows:
        print(f"| {name} | {'-' if s != s else f'{s:.1f}'} | {t:.1f} |")


if __name__ == "__main__":
    main()
