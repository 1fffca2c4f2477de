"""Segmentation metrics: confusion matrix, IoU / mIoU, and their table / JSON / CSV outputs.

method §6: one confusion matrix over all images of the val set; ``IoU_c = TP / (TP + FP + FN)``;
mIoU = mean over the protocol's evaluated classes (all 15 for VIPER→Cityscapes, 11 of 12 for
SYNTHIA-Seq→Cityscapes); a class with no pixel in prediction or label counts as 0 (the release's
``nanmean``-free behaviour: ``0 / max(0, 1)``).

Convention: ``cm[label, pred]`` — rows are ground truth, columns are predictions.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "format_keyframe_table",
    "confusion_matrix",
    "iou_from_confusion",
    "metrics_record",
    "format_table",
    "write_json",
    "write_csv",
]


def confusion_matrix(pred, label, num_classes: int) -> torch.Tensor:
    """Confusion matrix of one prediction/label pair (any shape, e.g. ``B×H×W``), on the device.

    ``pred`` and ``label`` are integer tensors (or arrays) of equal shape. Pixels whose label is
    outside ``[0, num_classes)`` (ignore ``-1``, or 255) are skipped, as are (defensively)
    predictions outside that range. Returns a ``C×C`` int64 tensor ``cm[label, pred]`` on the
    device of ``pred``, computed by a single ``bincount``.
    """
    pred = torch.as_tensor(pred)
    label = torch.as_tensor(label, device=pred.device)
    if pred.shape != label.shape:
        raise ValueError(
            f"confusion_matrix: pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}"
        )
    if pred.is_floating_point() or label.is_floating_point():
        raise TypeError("confusion_matrix expects integer class ids (did you forget argmax?)")
    pred = pred.reshape(-1).long()
    label = label.reshape(-1).long()
    valid = (label >= 0) & (label < num_classes) & (pred >= 0) & (pred < num_classes)
    idx = label[valid] * num_classes + pred[valid]
    cm = torch.bincount(idx, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).long()


def iou_from_confusion(cm, eval_ids: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Per-class IoU (``C`` float64 fractions) and the mIoU over ``eval_ids`` (all classes if None).

    ``IoU_c = TP / (TP + FP + FN)`` with ``TP = cm[c, c]``, ``FN`` = rest of row c, ``FP`` = rest
    of column c; a class absent from both prediction and label gets IoU 0 and still counts in the
    mean (method §6).
    """
    cm = torch.as_tensor(cm).detach().cpu().to(torch.float64).numpy()
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"iou_from_confusion: expected a square matrix, got shape {cm.shape}")
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp  # TP + FP + FN
    iou = tp / np.maximum(union, 1.0)
    ids = list(range(cm.shape[0])) if eval_ids is None else list(eval_ids)
    if not ids or min(ids) < 0 or max(ids) >= cm.shape[0]:
        raise ValueError(f"eval_ids {ids} out of range for {cm.shape[0]} classes")
    return iou, float(iou[ids].mean())


def metrics_record(
    iou: np.ndarray,
    miou: float,
    class_names: Sequence[str],
    eval_ids: Sequence[int] | None = None,
    num_images: int | None = None,
    protocol: str | None = None,
    checkpoint: str | None = None,
    **extra,
) -> dict:
    """The JSON-ready result: all values are fractions in [0, 1] (``"units": "fraction"``).

    ``per_class`` holds the evaluated classes (their plain mean is ``miou``);
    ``per_class_not_in_mean`` the trained but unevaluated ones (SYNTHIA-Seq's fence).
    """
    ids = list(range(len(class_names))) if eval_ids is None else list(eval_ids)
    if len(iou) != len(class_names):
        raise ValueError(f"{len(iou)} IoU values but {len(class_names)} class names")
    rec = {
        "miou": float(miou),
        "per_class": {class_names[i]: float(iou[i]) for i in ids},
        "per_class_not_in_mean": {
            class_names[i]: float(iou[i]) for i in range(len(class_names)) if i not in ids
        },
        "num_images": None if num_images is None else int(num_images),
        "num_classes": len(class_names),
        "num_eval_classes": len(ids),
        "protocol": protocol,
        "checkpoint": checkpoint,
        "units": "fraction",
    }
    rec.update(extra)
    return rec


def format_table(record: dict) -> str:
    """A readable per-class IoU table in percent, from :func:`metrics_record`'s output."""
    rows = [(n, v, "") for n, v in record["per_class"].items()]
    rows += [(n, v, " (not in mean)") for n, v in record.get("per_class_not_in_mean", {}).items()]
    width = max([len(n) for n, _, _ in rows] + [len("mIoU")])
    lines = []
    head = []
    for key in ("checkpoint", "checkpoint_which", "mode", "source", "protocol", "num_images"):
        if record.get(key) is not None:
            head.append(f"{key}: {record[key]}")
    if head:
        lines.append(" | ".join(head))
    lines.append(f"{'class':<{width}}  IoU (%)")
    lines.append("-" * (width + 10))
    for name, v, note in rows:
        lines.append(f"{name:<{width}}  {100 * v:7.2f}{note}")
    lines.append("-" * (width + 10))
    n_eval = record.get("num_eval_classes", len(record["per_class"]))
    lines.append(f"{'mIoU':<{width}}  {100 * record['miou']:7.2f}  (mean of {n_eval} classes)")
    if record.get("keyframe_distances"):
        lines += ["", format_keyframe_table(record)]
    return "\n".join(lines)


def format_keyframe_table(record: dict) -> str:
    """mIoU (and TC) per keyframe distance K, in percent."""
    rows = record["keyframe_distances"]
    tc = any("tc" in r for r in rows)
    head = f"{'K (keyframe distance)':<22}{'mIoU (%)':>10}" + (f"{'TC (%)':>10}" if tc else "")
    out = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['keyframe_distance']:<22}{100 * r['miou']:>10.2f}"
        if tc:
            line += f"{100 * r['tc']['tc']:>10.2f}" if "tc" in r else f"{'—':>10}"
        out.append(line)
    if tc:
        out.append(f"TC: the prediction at t against t-1 warped by flow, last "
                   f"{rows[0]['tc']['pairs']} pairs of each snippet")
    return "\n".join(out)


def _parent(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def write_json(path: str, record: dict) -> None:
    """Write :func:`metrics_record`'s output as indented JSON (fractions)."""
    _parent(path)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


def write_csv(path: str, record: dict) -> None:
    """CSV with columns ``class, iou, iou_percent, in_mean`` (the first keyframe distance), then
    ``iou_k<K>`` per keyframe distance and ``tc_k<K>`` (per-class TC IoU) when measured; the
    last rows are ``mIoU`` and, with TC, ``TC``."""
    _parent(path)
    ks = record.get("keyframe_distances") or []
    tcs = [r for r in ks if "tc" in r]

    def extra(name, key="per_class"):
        vals = [r[key].get(name) for r in ks] + [r["tc"]["per_class"].get(name) for r in tcs]
        return ["" if v is None else f"{v:.6f}" for v in vals]

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "iou", "iou_percent", "in_mean"]
                   + [f"iou_k{r['keyframe_distance']}" for r in ks]
                   + [f"tc_k{r['keyframe_distance']}" for r in tcs])
        for name, v in record["per_class"].items():
            w.writerow([name, f"{v:.6f}", f"{100 * v:.2f}", 1] + extra(name))
        for name, v in record.get("per_class_not_in_mean", {}).items():
            w.writerow([name, f"{v:.6f}", f"{100 * v:.2f}", 0] + [""] * (len(ks) + len(tcs)))
        w.writerow(["mIoU", f"{record['miou']:.6f}", f"{100 * record['miou']:.2f}", 1]
                   + [f"{r['miou']:.6f}" for r in ks] + [""] * len(tcs))
        if tcs:
            tc0 = tcs[0]["tc"]["tc"]
            w.writerow(["TC", f"{tc0:.6f}", f"{100 * tc0:.2f}", 1] + [""] * len(ks)
                       + [f"{r['tc']['tc']:.6f}" for r in tcs])
