"""Evaluation loops shared by ``python -m sfc.evaluate`` and the in-training validation (method §6).

Every loop runs the model in eval mode (BatchNorm running statistics) under ``no_grad``, builds
one confusion matrix per process on the device (one ``bincount`` per batch), sums it over the
processes (:func:`sfc.dist.all_reduce_sum`, exact for integers) and only then computes IoU —
so a sharded evaluation (``ShardSampler``) gives exactly the single-process number.

Protocols (method §6, quirk 9):
* ``release``: the label resized (PIL nearest) to the eval input size, 1024×512 for
  Cityscapes — what the dataset item's ``"label"`` already is.
* ``full``: logits upsampled bilinearly (``align_corners=False``) to the label's native size
  (2048×1024) and compared with the native label (DA-VSN / TPS). The loader's items must carry
  ``"label_full"``: wrap the dataset in :class:`sfc.evaluate.data.NativeLabels`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sfc import dist
from sfc.evaluate.metrics import confusion_matrix, iou_from_confusion

PROTOCOLS = ("release", "full")
LABEL_KEYS = {"release": "label", "full": "label_full"}


def _autocast(device: torch.device, amp: str | None):
    if amp in (None, "none", "fp32"):
        return contextlib.nullcontext()
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")


def _label_of(batch: dict, protocol: str) -> torch.Tensor:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    key = LABEL_KEYS[protocol]
    if key not in batch:
        raise KeyError(
            f"protocol {protocol!r} needs batch[{key!r}] (native-resolution labels): wrap the "
            "dataset in sfc.evaluate.NativeLabels"
        )
    return batch[key]


class _EvalMode:
    """Put modules in eval mode for the duration, restore their previous mode afterwards."""

    def __init__(self, *modules: torch.nn.Module):
        self.modules = modules

    def __enter__(self):
        self.was = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, was in zip(self.modules, self.was):
            m.train(was)


def _confusion_loop(
    predict: Callable[[dict], torch.Tensor],
    modules: Sequence[torch.nn.Module],
    loader,
    num_classes: int,
    eval_ids,
    device,
    protocol: str,
    limit: int | None,
    progress: bool,
    amp: str | None,
    pred_hook: Callable | None,
    desc: str,
) -> dict:
    device = torch.device(device)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    seen = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    if limit is not None:  # the batches that hold the first `limit` images, no more reads
        total = -(-limit // (getattr(loader, "batch_size", None) or 1))
        loader = itertools.islice(loader, total)
    # every process reaches the end of the loop (and its agreement on data errors): no break
    bar = tqdm(dist.agreed(loader), total=total, desc=desc,
               disable=not (progress and dist.is_main()),
               dynamic_ncols=True, leave=False)
    with _EvalMode(*modules), torch.no_grad():
        for batch in bar:
            if limit is not None and seen >= limit:
                continue
            label = _label_of(batch, protocol).to(device, non_blocking=True)  # (B, h, w)
            if limit is not None and seen + label.shape[0] > limit:
                keep = limit - seen
                batch = {k: v[:keep] for k, v in batch.items()}
                label = label[:keep]
            with _autocast(device, amp):
                logits = predict(batch)  # (B, C, h', w')
            if logits.shape[1] != num_classes:
                raise ValueError(f"model outputs {logits.shape[1]} classes, evaluation expects "
                                 f"{num_classes}")
            logits = logits.float()
            if tuple(logits.shape[-2:]) != tuple(label.shape[-2:]):
                logits = F.interpolate(logits, size=tuple(label.shape[-2:]), mode="bilinear",
                                       align_corners=False)
            pred = logits.argmax(dim=1)  # (B, h, w) train ids
            cm += confusion_matrix(pred, label, num_classes)
            seen += label.shape[0]
            if pred_hook is not None:
                pred_hook(list(batch.get("name", [None] * label.shape[0])), pred.cpu())
    bar.close()
    dist.all_reduce_sum(cm)
    n = dist.all_reduce_sum(torch.tensor([seen], dtype=torch.int64, device=device))
    iou, miou = iou_from_confusion(cm, eval_ids)
    return {"miou": miou, "per_class": iou, "confusion": cm.cpu(), "num_images": int(n.item()),
            "protocol": protocol}


def evaluate_segnet(model, loader, num_classes: int, eval_ids=None, device="cpu",
                    protocol: str = "release", limit: int | None = None, progress: bool = True,
                    amp: str | None = None, pred_hook: Callable | None = None) -> dict:
    """Single-frame SegNet (a ``DeepLabV2``) on the annotated frame f (the clip's last frame).

    A multi-level model's main head (``layer6``) is used. Its 1/8 logits are upsampled
    bilinearly (``align_corners=False``) to the label size — ×8 to 1024×512 under ``release``,
    as the release's stage-one validation does. Returns ``{"miou": float, "per_class": (C,)
    float64 array of IoU fractions, "confusion": C×C int64 (rows label, columns prediction),
    "num_images": int, "protocol": str}`` summed over all processes. ``limit`` caps the images
    of this process; ``pred_hook(names, pred)`` receives each batch's ``B×h×w`` predictions.
    """
    device = torch.device(device)

    def predict(batch):
        seg = batch["seg"][:, :, -1].to(device, non_blocking=True)  # (B, 3, H, W), frame f
        out = model(seg)
        return out[0] if isinstance(out, (tuple, list)) else out  # main head, (B, C, H/8, W/8)

    return _confusion_loop(predict, [model], loader, num_classes, eval_ids, device, protocol,
                           limit, progress, amp, pred_hook, "eval segnet")


def evaluate_accel(model, loader, num_classes: int, eval_ids=None, device="cpu",
                   protocol: str = "release", limit: int | None = None, progress: bool = True,
                   amp: str | None = None, pred_hook: Callable | None = None,
                   keyframe_distance: int = 1) -> dict:
    """Accel on the clip (f-K, ..., f) → logits for f at the input size (method §6: K = 1, the
    clip (f-1, f)); the reference branch runs on the keyframe f-K and is propagated through K
    flows. Then as :func:`evaluate_segnet` (logits upsampled to the label size only under
    ``full``). Longer clips are cut to their last K+1 frames."""
    device = torch.device(device)
    k = int(keyframe_distance)

    def predict(batch):
        seg = batch["seg"][:, :, -(k + 1):].to(device, non_blocking=True)  # (B, 3, K+1, H, W)
        flow = batch["flow"][:, :, -(k + 1):].to(device, non_blocking=True)
        if seg.shape[2] != k + 1:
            raise ValueError(f"Accel evaluation with keyframe distance {k} needs clips of "
                             f">= {k + 1} frames, got {seg.shape[2]}")
        return model(seg, flow)  # (B, C, H, W)

    return _confusion_loop(predict, [model], loader, num_classes, eval_ids, device, protocol,
                           limit, progress, amp, pred_hook,
                           "eval accel" + (f" K={k}" if k != 1 else ""))


def evaluate_sfm(sfm, flownet_global, loader, device="cpu", limit: int | None = None,
                 progress: bool = True, amp: str | None = None) -> dict:
    """SFM validation (method §5, release): the SFM's segmentation-based flow from the hard
    ground-truth masks of frames f-1 and f (classes present in either label) against
    ``flownet_global``'s flow, EPE **unmasked**, mean over each image's pixels, then the mean
    of those per-image means. Items need ``"flow"`` (3×T×H×W), ``"label"`` and
    ``"label_prev"`` (``ViperSeq(prev_label=True)``). Returns ``{"epe": float (pixels of the
    1/4 flow grid), "epe_zero": the same mean for a zero SF (the mean ‖OF‖: what an SFM that
    predicts nothing would score), "num_images": int}``, summed over all processes.
    """
    from sfc.losses import global_flow, sfm_loss  # late import: only this loop needs them

    device = torch.device(device)
    total = torch.zeros(1, dtype=torch.float64, device=device)
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    seen = 0
    n_batches = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(dist.agreed(loader), total=n_batches, desc="eval sfm",
               disable=not (progress and dist.is_main()), dynamic_ncols=True, leave=False)
    with _EvalMode(sfm, flownet_global), torch.no_grad():
        for batch in bar:
            flow = batch["flow"].to(device, non_blocking=True)  # (B, 3, T, H, W)
            label = batch["label"].to(device, non_blocking=True)  # (B, H, W)
            label_prev = batch["label_prev"].to(device, non_blocking=True)
            for b in range(flow.shape[0]):  # per image: the mean of per-image means
                if limit is not None and seen >= limit:
                    break
                with _autocast(device, amp):
                    of = global_flow(flownet_global, flow[b:b + 1, :, -2],
                                     flow[b:b + 1, :, -1])
                    e = sfm_loss(flow[b:b + 1, :, -2], flow[b:b + 1, :, -1],
                                 label_prev[b:b + 1], label[b:b + 1], flownet_global, sfm,
                                 gt_down4x=None, of=of)
                total += e.detach().double()
                zero += torch.linalg.vector_norm(of.double(), dim=1).mean()
                seen += 1
            if limit is not None and seen >= limit:
                break
    bar.close()
    dist.all_reduce_sum(total)
    dist.all_reduce_sum(zero)
    n = dist.all_reduce_sum(torch.tensor([seen], dtype=torch.int64, device=device))
    n_img = int(n.item())
    return {"epe": float(total.item() / max(n_img, 1)),
            "epe_zero": float(zero.item() / max(n_img, 1)), "num_images": n_img}
