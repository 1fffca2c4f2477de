"""Losses of SFC (method §4). Each returns an unweighted scalar; stages apply their weights.

Frozen networks: `flownet_global` runs under `torch.no_grad()` (its flow is the detached
target). The SFM runs through `torch.func.functional_call` with *detached* parameters, so the
gradient reaches the soft masks (and the SegNet) but never the SFM's parameters — whether or not
the caller has set `requires_grad_(False)` — and no `.grad` is ever left on them. Both nets have
no BatchNorm/dropout, so train/eval mode does not change their output.

Precision: softmax and EPE run in at least float32 (float64 inputs stay float64); under a
bf16/fp16 autocast the networks' convolutions run in low precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sfc.models.deeplab import upsample_like
from sfc.models.stacked import forward_pair

AUX_WEIGHT = 0.1  # multi-level: main + 0.1 · aux (method §4)
IGNORE = -1


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Promote bf16/fp16 to float32; float32/64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _flow_grid(size) -> tuple[int, int]:
    return ((size[0] + 3) // 4, (size[1] + 3) // 4)  # FlowNetS output grid (⌈H/4⌉, ⌈W/4⌉)


def epe(pred: torch.Tensor, target: torch.Tensor, gt: torch.Tensor | None = None) -> torch.Tensor:
    """End-point error: mean over pixels (and batch) of `‖pred − target‖₂` over dim 1.

    pred/target `B×2×h×w`; with `gt` (`B×h×w` labels) pixels where `gt == -1` are excluded
    (mean over the remaining pixels of the whole batch; 0 when none remain — the release would
    give NaN).
    """
    if pred.shape != target.shape:
        raise ValueError(f"epe: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    dist = torch.linalg.vector_norm(_wide(target) - _wide(pred), ord=2, dim=1)  # (B, h, w)
    if gt is None:
        return dist.mean()
    if gt.shape != dist.shape:
        raise ValueError(f"epe: gt {tuple(gt.shape)} must be the flow grid {tuple(dist.shape)}")
    valid = gt != IGNORE
    return (dist * valid).sum() / valid.sum().clamp(min=1)


def seg_loss(logits, gt: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (ignore -1) after bilinear upsampling (`align_corners=False`) to gt's size.

    logits `B×C×h×w` or a `(main, aux)` tuple → `CE(main) + 0.1·CE(aux)`; gt `B×H×W` int64.
    A label with no valid pixel gives 0 (with a graph) instead of NaN.
    """
    if isinstance(logits, (tuple, list)):
        main, aux = logits
        return seg_loss(main, gt) + AUX_WEIGHT * seg_loss(aux, gt)
    if gt.dim() != 3 or gt.shape[0] != logits.shape[0]:
        raise ValueError(f"seg_loss: gt must be B×H×W for logits {tuple(logits.shape)}, "
                         f"got {tuple(gt.shape)}")
    up = _wide(upsample_like(logits, gt.shape[-2:]))
    loss = F.cross_entropy(up, gt.long(), ignore_index=IGNORE, reduction="sum")
    return loss / (gt != IGNORE).sum().clamp(min=1)


def soft_masks(logits: torch.Tensor, size, scale: float = 100.0) -> torch.Tensor:
    """`softmax(scale · upsample(logits, size), dim=1)`: `B×C×H×W` soft class masks."""
    return torch.softmax(scale * _wide(upsample_like(logits, size)), dim=1)


def _run_sfm(sfm: nn.Module, x: torch.Tensor, frozen: bool) -> torch.Tensor:
    """Run the SFM; `frozen`: with detached parameters (gradients to x only, never the SFM)."""
    if not frozen:
        return sfm(x)
    params = {k: v.detach() for k, v in sfm.named_parameters()}
    params.update(dict(sfm.named_buffers()))
    return functional_call(sfm, params, (x,))


def segmentation_based_flow(masks_prev: torch.Tensor, masks_cur: torch.Tensor,
                            img_prev: torch.Tensor, img_cur: torch.Tensor, sfm: nn.Module,
                            present: torch.Tensor | None = None,
                            frozen_sfm: bool = True) -> torch.Tensor:
    """SF = Σ_c SFM(cat[img_t·M_t^c, img_{t-1}·M_{t-1}^c]) per sample (method §3.5) → `B×2×h×w`.

    masks `B×C×H×W`, images `B×3×H×W` (flow-normalised). All classes run as one `B·C` batch.
    `present` (`B×C` bool): sum only these classes (absent ones are not run, contributing
    exactly 0 as in the release's loop, which skips them; note SFM(0) ≠ 0).
    `frozen_sfm=False` lets gradients reach the SFM's parameters (SFM pre-training).
    """
    if masks_prev.shape != masks_cur.shape or masks_cur.dim() != 4:
        raise ValueError(f"masks must both be B×C×H×W, got {tuple(masks_prev.shape)} and "
                         f"{tuple(masks_cur.shape)}")
    b, c, h, w = masks_cur.shape
    for name, img in (("img_prev", img_prev), ("img_cur", img_cur)):
        if img.shape != (b, 3, h, w):
            raise ValueError(f"{name} must be {(b, 3, h, w)} to match the masks, "
                             f"got {tuple(img.shape)}")
    # (B, C, 6, H, W): frame t masked by class c, then frame t-1 masked by class c.
    x = torch.cat((img_cur.unsqueeze(1) * masks_cur.unsqueeze(2),
                   img_prev.unsqueeze(1) * masks_prev.unsqueeze(2)), dim=2)
    x = x.reshape(b * c, 6, h, w)
    if present is None:
        flows = _run_sfm(sfm, x, frozen_sfm)  # (B·C, 2, ⌈H/4⌉, ⌈W/4⌉)
        return _wide(flows).reshape(b, c, *flows.shape[1:]).sum(dim=1)
    if present.shape != (b, c):
        raise ValueError(f"present must be B×C = {(b, c)}, got {tuple(present.shape)}")
    keep = present.reshape(-1).nonzero().squeeze(1)  # indices into the B·C batch
    out = torch.zeros((b, 2, *_flow_grid((h, w))), dtype=_wide(x).dtype, device=x.device)
    if keep.numel() == 0:
        return out
    flows = _wide(_run_sfm(sfm, x.index_select(0, keep), frozen_sfm))
    return out.index_add(0, torch.div(keep, c, rounding_mode="floor"), flows)


@torch.no_grad()
def global_flow(flownet_global: nn.Module, img_prev: torch.Tensor,
                img_cur: torch.Tensor) -> torch.Tensor:
    """OF = flownet_global(cat[img_t, img_{t-1}]) under no_grad: the detached target flow."""
    return _wide(flownet_global(torch.cat((img_cur, img_prev), 1)))


def _sf_from_logits(logits_prev, logits_cur, img_prev, img_cur, sfm, scale):
    size = img_cur.shape[-2:]
    return segmentation_based_flow(soft_masks(logits_prev, size, scale),
                                   soft_masks(logits_cur, size, scale), img_prev, img_cur, sfm)


def sfc_loss(logits_prev, logits_cur, img_prev: torch.Tensor, img_cur: torch.Tensor,
             flownet_global: nn.Module, sfm: nn.Module, scale: float = 100.0) -> torch.Tensor:
    """Stage-one SFC loss: `EPE(SF(P_{t-1}, P_t), OF)`, unmasked (method §4).

    logits `B×C×h×w` (upsampled to the image size here) or `(main, aux)` tuples →
    `EPE(SF_main, OF) + 0.1·EPE(SF_aux, OF)`. Images `B×3×H×W`, flow-normalised.
    """
    of = global_flow(flownet_global, img_prev, img_cur)
    if isinstance(logits_cur, (tuple, list)) != isinstance(logits_prev, (tuple, list)):
        raise ValueError("sfc_loss: logits_prev and logits_cur must both be tensors or both "
                         "(main, aux) tuples")
    if isinstance(logits_cur, (tuple, list)):
        (main_p, aux_p), (main_c, aux_c) = logits_prev, logits_cur
        return (epe(_sf_from_logits(main_p, main_c, img_prev, img_cur, sfm, scale), of)
                + AUX_WEIGHT * epe(_sf_from_logits(aux_p, aux_c, img_prev, img_cur, sfm, scale),
                                   of))
    return epe(_sf_from_logits(logits_prev, logits_cur, img_prev, img_cur, sfm, scale), of)


def one_hot_masks(gt: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard masks `B×C×H×W` (dtype float32) from labels `B×H×W`; -1 gives an all-zero column."""
    classes = torch.arange(num_classes, device=gt.device).view(1, -1, 1, 1)
    return (gt.unsqueeze(1) == classes).float()


def sfm_loss(img_prev: torch.Tensor, img_cur: torch.Tensor, gt_prev: torch.Tensor,
             gt_cur: torch.Tensor, flownet_global: nn.Module, sfm: nn.Module,
             gt_down4x: torch.Tensor | None = None,
             of: torch.Tensor | None = None,
             num_classes: int | None = None) -> torch.Tensor:
    """SFM pre-training loss: `EPE(SF_gt, OF)` masked by `gt_down4x` (method §4). `of`: the
    caller's `global_flow(flownet_global, img_prev, img_cur)` if it has it (else computed).

    gt_prev/gt_cur `B×H×W` labels at image size (-1 ignore); one-hot masks; only classes present
    in either label (per sample) are summed. gt_down4x `B×⌈H/4⌉×⌈W/4⌉` current label on the flow
    grid, or None for an unmasked EPE. `num_classes`: labels are < it (the dataset's count);
    the same loss, bit for bit, as without it. Gradients reach the SFM's parameters here.
    """
    if gt_prev.shape != gt_cur.shape or gt_cur.shape != (img_cur.shape[0], *img_cur.shape[-2:]):
        raise ValueError(f"sfm_loss: gt_prev {tuple(gt_prev.shape)} and gt_cur "
                         f"{tuple(gt_cur.shape)} must be B×H×W of the images "
                         f"{tuple(img_cur.shape)}")
    if of is None:
        of = global_flow(flownet_global, img_prev, img_cur)
    # Only presence matters, so any C above the largest label gives the same loss: the
    # dataset's class count when the caller knows it (no host read), else the largest label + 1
    if num_classes is None:
        num_classes = int(max(gt_prev.max().item(), gt_cur.max().item(), 0)) + 1
    m_prev = one_hot_masks(gt_prev, num_classes).to(img_prev.dtype)
    m_cur = one_hot_masks(gt_cur, num_classes).to(img_cur.dtype)
    present = (m_prev.flatten(2).amax(dim=2) + m_cur.flatten(2).amax(dim=2)) > 0  # (B, C)
    sf = segmentation_based_flow(m_prev, m_cur, img_prev, img_cur, sfm, present=present,
                                 frozen_sfm=False)
    return epe(sf, of, gt_down4x)


def accel_sfc_loss(seg_clip: torch.Tensor, flow_clip: torch.Tensor,
                   seg_clip_prev: torch.Tensor, flow_clip_prev: torch.Tensor, accel: nn.Module,
                   flownet_global: nn.Module, sfm: nn.Module,
                   scale: float = 100.0, stack: bool = False) -> torch.Tensor:
    """Stage-two SFC loss (method §4): Accel predicts frame t from `(seg_clip, flow_clip)` (frames
    t-1, t) and frame t-1 from the `_prev` clips (t-2, t-1); SF from both predictions' soft
    masks on the flow images of t-1 and t; `EPE(SF, OF)`, no aux. Clips `B×3×T×H×W`.

    Two separate Accel calls (frame t first), as batch-statistics BatchNorm needs — or, with
    `stack`, one call on both clips with per-clip BatchNorm statistics (`accel_pair`).
    """
    logits_cur, logits_prev = accel_pair(accel, seg_clip, flow_clip, seg_clip_prev,
                                         flow_clip_prev, stack=stack)  # (B, C, H, W) each
    img_cur, img_prev = flow_clip[:, :, -1], flow_clip_prev[:, :, -1]
    of = global_flow(flownet_global, img_prev, img_cur)
    return epe(_sf_from_logits(logits_prev, logits_cur, img_prev, img_cur, sfm, scale), of)


def accel_pair(accel: nn.Module, seg_clip: torch.Tensor, flow_clip: torch.Tensor,
               seg_clip_2: torch.Tensor, flow_clip_2: torch.Tensor, stack: bool = False):
    """Accel on two clips of one size, the first first: two calls, or with `stack` one call on
    both stacked along the batch inside `stacked(2)` (sfc.models.stacked: each clip's own
    BatchNorm statistics and the running statistics moved in the same order — the same
    numbers within float rounding, in kernels of twice the work)."""
    return forward_pair(accel, (seg_clip, flow_clip), (seg_clip_2, flow_clip_2), stack)


# Flying-Chairs pre-training of a FlowNetS (docs/flow.md): the multi-scale EPE of the common
# PyTorch FlowNet code (ClementPinard/FlowNetPytorch) — flow2..flow6 against the target divided
# by 20 and area-downsampled to each output's size, each scale's EPE summed over its pixels and
# averaged over the batch, weighted 0.005, 0.01, 0.02, 0.08, 0.32.
MULTISCALE_WEIGHTS = (0.005, 0.01, 0.02, 0.08, 0.32)


def multiscale_epe(pyramid, target: torch.Tensor, div_flow: float = 20.0,
                   weights=MULTISCALE_WEIGHTS) -> torch.Tensor:
    """`pyramid` = `FlowNetS.pyramid(x)` (flow2 … flow6, in full-res pixels / `div_flow`);
    `target` `B×2×H×W` dense flow in pixels of the input. Returns the weighted sum of
    per-scale `Σ_pixels ‖pred − area(target / div_flow)‖₂ / B`."""
    if len(pyramid) != len(weights):
        raise ValueError(f"multiscale_epe: {len(pyramid)} outputs for {len(weights)} weights")
    if not torch.isfinite(target).all():
        raise ValueError("multiscale_epe needs a dense target (no NaN / Inf), as Flying Chairs")
    t = _wide(target) / div_flow
    total = t.new_zeros(())
    for w, out in zip(weights, pyramid):
        scaled = F.interpolate(t, size=tuple(out.shape[-2:]), mode="area")
        dist = torch.linalg.vector_norm(scaled - _wide(out), ord=2, dim=1)  # (B, h, w)
        total = total + w * dist.sum() / out.shape[0]
    return total
