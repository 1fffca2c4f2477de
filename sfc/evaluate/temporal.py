"""Temporal consistency (TC) of a video model's predictions (issue 12).

TC is the mIoU between the prediction at frame t and the prediction at t-1 warped to t by
optical flow, accumulated in one confusion matrix over the last `pairs` frame pairs before (and
ending at) the labelled frame of every val snippet. Every model compared is judged with the same
flow: the val set's ground truth (`--tc-flow gt`, the synthetic target: independent of every
model), or one fixed FlowNet (`--tc-flownet`; best one no compared model trained against, a
Flying-Chairs FlowNetS — never flownet_global, which the SFC loss trains the SegNets to agree
with). Conventions:

* with ground truth, the comparison runs the other way: the prediction at t is warped back to
  t-1 by the true forward flow t-1 → t (nearest neighbour) and compared with the prediction at
  t-1 on the pixels whose flow is valid (not occluded, not leaving the frame);

* the flow is the FlowNetS's backward flow at 1/4 resolution, `flownet(cat[img_t, img_{t-1}])`
  (pixels of the 1/4 grid), upsampled bilinearly to the prediction size and scaled by 4;
* the prediction of t-1 is sampled at `p + flow(p)` by nearest neighbour (a label map); pixels
  whose source falls outside the image are left out;
* the mean is over the protocol's evaluated classes that occur in either map (a class absent
  from both predictions is not "inconsistent"); a constant prediction under zero flow has TC 1.
* Accel predicts frame t from the clip (t-K, ..., t) with the keyframe distance K of the
  evaluation; a single-frame SegNet from frame t alone.

Liu et al.'s convention (ECCV 2020, the TC that DA-VSN and TPS publish; `convention="liu"`):
all consecutive pairs of the whole 30-frame snippet (the clips then run past the labelled frame,
`CityscapesSeq(frames=20, after=10)`; a sliding keyframe K leaves the first K frames without a
prediction, so 29 - K pairs), one confusion matrix over all pairs and snippets, and the mean IoU
over *all* evaluated classes, a class absent from both maps counting 0 (their code divides
0 by 0 + 1e-10). The flow and the warp stay those above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sfc import dist
from sfc.evaluate.metrics import confusion_matrix


def upsample_flow(flow: torch.Tensor, size) -> torch.Tensor:
    """Flow `B×2×h×w` in pixels of its grid → `B×2×H×W` in pixels of the `size` grid."""
    h, w = flow.shape[-2:]
    up = F.interpolate(flow.float(), size=tuple(size), mode="bilinear", align_corners=False)
    scale = torch.tensor([size[1] / w, size[0] / h], device=flow.device).view(1, 2, 1, 1)
    return up * scale


def warp_labels(labels: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`out(p) = labels(p + flow(p))` by nearest neighbour; labels `B×H×W` int, flow `B×2×H×W`
    (pixels); -1 where the source lies outside the image."""
    b, h, w = labels.shape
    ys = torch.arange(h, device=labels.device).view(1, h, 1).float()
    xs = torch.arange(w, device=labels.device).view(1, 1, w).float()
    sx = torch.round(xs + flow[:, 0]).long()  # (B, H, W)
    sy = torch.round(ys + flow[:, 1]).long()
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    idx = sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)
    out = labels.reshape(b, -1).gather(1, idx.reshape(b, -1)).reshape(b, h, w)
    return torch.where(inside, out, torch.full_like(out, -1))


CONVENTIONS = ("sfc", "liu")


def tc_from_confusion(cm: torch.Tensor, eval_ids,
                      convention: str = "sfc") -> tuple[float, list[float | None]]:
    """(TC, per-class IoU or None for classes absent from both maps) of `cm[pred_t, warped]`.
    The mean is over the evaluated classes present in either map ("sfc"), or over all of them
    with the absent ones counting 0 ("liu")."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    cm = cm.double().cpu()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    ids = list(eval_ids)
    per = [float(tp[i] / union[i]) if union[i] > 0 else None for i in range(cm.shape[0])]
    if convention == "liu":
        return sum(per[i] or 0.0 for i in ids) / len(ids), per
    present = [per[i] for i in ids if per[i] is not None]
    return (sum(present) / len(present) if present else float("nan")), per


@torch.no_grad()
def consistency_confusion(pred_t: torch.Tensor, pred_prev: torch.Tensor, flow: torch.Tensor,
                          num_classes: int) -> torch.Tensor:
    """Confusion matrix between `pred_t` and `pred_prev` warped to t (`flow` at any grid)."""
    warped = warp_labels(pred_prev, upsample_flow(flow, pred_t.shape[-2:]))
    return confusion_matrix(warped, pred_t, num_classes)


@torch.no_grad()
def gt_consistency_confusion(pred_prev: torch.Tensor, pred_t: torch.Tensor,
                             forward_flow: torch.Tensor, num_classes: int) -> torch.Tensor:
    """With ground truth: the confusion matrix between `pred_prev` (frame t-1) and `pred_t`
    warped to t-1 by the true forward flow t-1 → t (`B×2×H×W` at the predictions' size, NaN
    where occluded or out of frame — those pixels are left out)."""
    valid = torch.isfinite(forward_flow).all(dim=1)
    warped = warp_labels(pred_t, torch.nan_to_num(forward_flow.float(), nan=0.0))
    warped = torch.where(valid, warped, torch.full_like(warped, -1))
    return confusion_matrix(warped, pred_prev, num_classes)


@torch.no_grad()
def evaluate_temporal_consistency(model, mode: str, loader, flownet, num_classes: int,
                                  eval_ids, pairs: int | None = 5, keyframe_distance: int = 1,
                                  device="cpu", progress: bool = True,
                                  convention: str = "sfc") -> dict:
    """TC over a loader of clips of `pairs + keyframe_distance + 1` frames, the last `pairs`
    pairs of each (`pairs=None`: every pair the clips allow, `T - keyframe_distance - 1`).
    `flownet` is a FlowNetS, or "gt": the clips' ground-truth forward flows
    (`CityscapesSeq(gt_flow=True)`, the synthetic target) judge. `convention`: the class mean
    of `tc_from_confusion`. Returns {"tc", "per_class" (None = absent), "pairs",
    "num_snippets", "keyframe_distance", "convention"}, summed over processes."""
    device = torch.device(device)
    k = int(keyframe_distance)
    need = None if pairs is None else pairs + k + 1
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    gt = isinstance(flownet, str)
    if gt and flownet != "gt":
        raise ValueError(f"flownet must be a FlowNetS or 'gt', got {flownet!r}")
    was = (model.training, None if gt else flownet.training)
    model.eval()
    if not gt:
        flownet.eval()
    seen = 0
    bar = tqdm(dist.agreed(loader), total=len(loader), desc=f"temporal consistency K={k}",
               leave=False, dynamic_ncols=True,
               disable=not (progress and dist.is_main()))
    for batch in bar:
        seg = batch["seg"].to(device)  # (B, 3, T, H, W)
        flw = batch["flow"].to(device)
        if need is None:  # every pair: a single-frame SegNet needs no history
            need, pairs = seg.shape[2], seg.shape[2] - (k if mode == "accel" else 0) - 1
        if pairs < 1 or seg.shape[2] < need:
            raise ValueError(f"temporal consistency over {pairs} pairs at keyframe distance {k} "
                             f"needs clips of {need} frames, got {seg.shape[2]}")
        seg, flw = seg[:, :, -need:], flw[:, :, -need:]
        b, t = seg.shape[0], seg.shape[2]
        # predictions for the last pairs+1 frames: frame j from the clip (j-K .. j) for Accel
        frames = range(t - pairs - 1, t)
        if mode == "accel":
            s = torch.cat([seg[:, :, j - k:j + 1] for j in frames])  # ((P+1)·B, 3, K+1, H, W)
            f = torch.cat([flw[:, :, j - k:j + 1] for j in frames])
            logits = model(s, f)
        else:
            out = model(torch.cat([seg[:, :, j] for j in frames]))
            logits = out[0] if isinstance(out, (tuple, list)) else out
        size = seg.shape[-2:]
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear",
                                   align_corners=False)
        pred = logits.argmax(1).view(pairs + 1, b, *size)  # (P+1, B, H, W)
        if gt:  # pred of t-1 against pred of t warped back by the true flow t-1 → t
            fg = batch["flow_gt"].to(device)[:, -need:]  # (B, T, 2, H, W)
            fwd = torch.cat([fg[:, j - 1] for j in frames[1:]])  # (P·B, 2, H, W)
            cm += gt_consistency_confusion(pred[:-1].reshape(-1, *size),
                                           pred[1:].reshape(-1, *size), fwd, num_classes)
            seen += b
            continue
        cur = torch.cat([flw[:, :, j] for j in frames[1:]])  # (P·B, 3, H, W), frames t
        prev = torch.cat([flw[:, :, j - 1] for j in frames[1:]])
        flow = flownet(torch.cat((cur, prev), 1))  # (P·B, 2, H/4, W/4), backward t → t-1
        cm += consistency_confusion(pred[1:].reshape(-1, *size), pred[:-1].reshape(-1, *size),
                                    flow, num_classes)
        seen += b
    bar.close()
    model.train(was[0])
    if not gt:
        flownet.train(was[1])
    dist.all_reduce_sum(cm)
    n = dist.all_reduce_sum(torch.tensor([seen], dtype=torch.int64, device=device))
    tc, per = tc_from_confusion(cm, eval_ids, convention)
    return {"tc": tc, "per_class": per, "pairs": pairs, "num_snippets": int(n.item()),
            "keyframe_distance": k, "convention": convention}


@torch.no_grad()
def evaluate_streaming_tc(model, loader, judge, num_classes: int, eval_ids,
                          keyframe_interval: int, device="cpu", progress: bool = True,
                          convention: str = "sfc") -> dict:
    """TC **as deployed**: the streaming Accel (`sfc.models.StreamingAccel`, interval N) runs
    through each clip from its first frame — keyframes output the reference branch alone,
    frames after them the propagated fusion — and TC accumulates over *all* consecutive pairs,
    so the switches at keyframes count. `judge`: a FlowNetS or "gt" (as
    `evaluate_temporal_consistency`), `convention` its class mean. Returns {"tc", "per_class",
    "pairs", "num_snippets", "keyframe_interval", "streaming": True, "convention"}."""
    from sfc.models.streaming import StreamingAccel

    device = torch.device(device)
    gt = isinstance(judge, str)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    stream = StreamingAccel(model, keyframe_interval)
    was = model.training
    model.eval()
    if not gt:
        judge.eval()
    seen, pairs = 0, 0
    bar = tqdm(dist.agreed(loader), total=len(loader),
               desc=f"streaming TC N={keyframe_interval}", leave=False,
               dynamic_ncols=True, disable=not (progress and dist.is_main()))
    for batch in bar:
        seg, flw = batch["seg"].to(device), batch["flow"].to(device)  # (B, 3, T, H, W)
        t_len = seg.shape[2]
        fwd = batch["flow_gt"].to(device) if gt else None  # (B, T, 2, H, W): t -> t+1
        stream.reset()
        preds = [stream.step(seg[:, :, t], flw[:, :, t]).argmax(1) for t in range(t_len)]
        for t in range(1, t_len):
            if gt:
                cm += gt_consistency_confusion(preds[t - 1], preds[t], fwd[:, t - 1],
                                               num_classes)
            else:
                flow = judge(torch.cat((flw[:, :, t], flw[:, :, t - 1]), 1))
                cm += consistency_confusion(preds[t], preds[t - 1], flow, num_classes)
        seen += seg.shape[0]
        pairs = t_len - 1
    bar.close()
    model.train(was)
    dist.all_reduce_sum(cm)
    n = dist.all_reduce_sum(torch.tensor([seen], dtype=torch.int64, device=device))
    tc, per = tc_from_confusion(cm, eval_ids, convention)
    return {"tc": tc, "per_class": per, "pairs": pairs, "num_snippets": int(n.item()),
            "keyframe_interval": int(keyframe_interval), "streaming": True,
            "convention": convention}
