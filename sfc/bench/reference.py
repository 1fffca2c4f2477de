"""A release-style reference of the SFC stage-one and SFM training steps, kept only so that
`python -m sfc.bench --reference` can check the project's loss values against it and time both.

What makes it "release-style" (how the authors' code computed these losses; method §3.5, §4 and
quirks 6, 7, 8), in contrast to `sfc.losses` / `sfc.train.stages`:
* segmentation-based flow: a Python loop of one SFM call per class (and per sample), each on a
  `1×6×H×W` input, summed; SFM pre-training skips the classes absent from both labels;
* the SFM keeps `requires_grad=True` in the SFC stages: its weight gradients are computed on
  every backward and never applied (quirk 6);
* `flownet_global` runs under autograd (parameters requiring grad) and its output is detached
  afterwards (quirk 6);
* SFC stage one also runs the SegNet on source frame t-1 WITH autograd; the output is unused and
  its graph stays alive until the end of the iteration (quirk 7);
* the DeepLab classifiers run as `nn.Conv2d` forward and backward (as in the release), not in the
  project's GEMM form (`sfc.models.aspp_gemm`).
Soft masks, EPE and the one-hot masks are written out again here (not imported from
`sfc.losses`) so that the equality check compares two independent implementations.
The optimiser is the project's `RepeatedSGD`/Adam (the release's duplicated-list SGD, emulated
exactly; method §3.1) — the optimiser is not what the reference is about.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sfc.models.aspp_gemm import aspp_impl
from sfc.models.dilated import dilated_impl
from sfc.train import optim

AUX_WEIGHT = 0.1


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 under autocast → float32; float64 stays float64 for tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---- the losses as the release computed them ----------------------------------------------
def release_soft_masks(logits: torch.Tensor, size, scale: float) -> torch.Tensor:
    """`softmax(scale · bilinear(logits → size, align_corners=False), dim=1)`, B×C×H×W."""
    up = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return torch.softmax(scale * _f32(up), dim=1)


def release_epe(pred: torch.Tensor, target: torch.Tensor, gt: torch.Tensor | None = None):
    """Mean L2 norm over dim 1 (B×2×h×w flows); with `gt` (B×h×w) over pixels != -1 only."""
    dist = torch.norm(_f32(target) - _f32(pred), p=2, dim=1)  # (B, h, w)
    if gt is None:
        return dist.mean()
    return dist[gt != -1].mean()


def release_global_flow(flownet_global: nn.Module, img_prev, img_cur) -> torch.Tensor:
    """OF computed under autograd (parameters require grad), then detached (quirk 6)."""
    return flownet_global(torch.cat((img_cur, img_prev), 1)).detach()


def release_sf(masks_prev, masks_cur, img_prev, img_cur, sfm: nn.Module,
               present: torch.Tensor | None = None) -> torch.Tensor:
    """SF = Σ_c SFM(cat[img_t·M_t^c, img_{t-1}·M_{t-1}^c]): one SFM call per class (and per
    sample — the release ran batch 1); `present` (B×C bool) skips absent classes."""
    b, c = masks_cur.shape[:2]
    out = []
    for i in range(b):
        flow = None
        for k in range(c):
            if present is not None and not bool(present[i, k]):
                continue
            x = torch.cat((img_cur[i:i + 1] * masks_cur[i:i + 1, k:k + 1],
                           img_prev[i:i + 1] * masks_prev[i:i + 1, k:k + 1]), 1)  # (1, 6, H, W)
            f = _f32(sfm(x))  # (1, 2, ⌈H/4⌉, ⌈W/4⌉)
            flow = f if flow is None else flow + f
        if flow is None:  # no class present: nothing summed
            h, w = masks_cur.shape[-2:]
            flow = torch.zeros(1, 2, (h + 3) // 4, (w + 3) // 4, device=masks_cur.device,
                               dtype=_f32(masks_cur).dtype)
        out.append(flow)
    return torch.cat(out, 0)


def release_sfc_loss(logits_prev, logits_cur, img_prev, img_cur, flownet_global, sfm,
                     scale: float = 100.0) -> torch.Tensor:
    """Stage-one SFC loss; `(main, aux)` tuples give `EPE_main + 0.1·EPE_aux`."""
    of = release_global_flow(flownet_global, img_prev, img_cur)
    size = img_cur.shape[-2:]

    def one(lp, lc):
        sf = release_sf(release_soft_masks(lp, size, scale), release_soft_masks(lc, size, scale),
                        img_prev, img_cur, sfm)
        return release_epe(sf, of)

    if isinstance(logits_cur, (tuple, list)):
        return one(logits_prev[0], logits_cur[0]) + AUX_WEIGHT * one(logits_prev[1],
                                                                     logits_cur[1])
    return one(logits_prev, logits_cur)


def release_sfm_loss(img_prev, img_cur, gt_prev, gt_cur, flownet_global, sfm, gt_down4x=None,
                     num_classes: int = 15) -> torch.Tensor:
    """SFM pre-training loss with a per-class loop of one-hot masks (classes absent from both
    labels skipped; quirk 8)."""
    of = release_global_flow(flownet_global, img_prev, img_cur)
    # one-hot masks by a loop over the classes, (B, C, H, W)
    m_prev = torch.stack([(gt_prev == k).to(img_prev.dtype) for k in range(num_classes)], 1)
    m_cur = torch.stack([(gt_cur == k).to(img_cur.dtype) for k in range(num_classes)], 1)
    present = (m_prev.flatten(2).amax(2) > 0) | (m_cur.flatten(2).amax(2) > 0)  # (B, C)
    return release_epe(release_sf(m_prev, m_cur, img_prev, img_cur, sfm, present), of, gt_down4x)


def _seg_ce(logits, gt):
    """Release segmentation loss: CE (ignore -1) on bilinear-upsampled logits, + 0.1·aux."""
    if isinstance(logits, (tuple, list)):
        return _seg_ce(logits[0], gt) + AUX_WEIGHT * _seg_ce(logits[1], gt)
    up = F.interpolate(logits, size=gt.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(_f32(up), gt, ignore_index=-1)


def _unfrozen_copy(net: nn.Module) -> nn.Module:
    """A copy whose parameters all require grad (the release never froze these nets)."""
    net = copy.deepcopy(net)
    for p in net.parameters():
        p.requires_grad_(True)
    return net


# ---- release-style training steps built next to a project stage ---------------------------
class ReleaseSegNetSFC:
    """SFC stage one as the release ran it, on deep copies of a project `SegNetStage` (taken
    before its first step, so both start from identical states and can run in lockstep)."""

    kind = "segnet_sfc"

    def __init__(self, stage):
        cfg = stage.cfg
        self.cfg, self.autocast = cfg, stage.autocast
        self.net = copy.deepcopy(stage.nets["segnet"])
        self.flownet_global = _unfrozen_copy(stage.nets["flownet_global"])
        self.sfm = _unfrozen_copy(stage.nets["sfm"])
        groups = optim.segnet_param_groups(self.net, cfg.lr, release=cfg.optimizer == "release")
        self.optimizer = optim.make_sgd(groups, lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay)

    def sync_from(self, stage) -> None:
        """Copy the project stage's SegNet (parameters, BN statistics) and optimiser state, so
        that the next step of both starts from identical states."""
        self.net.load_state_dict(stage.nets["segnet"].state_dict())
        self.optimizer.load_state_dict(stage.optimizer.state_dict())

    def step(self, src: dict, tgt: dict, i: int = 0) -> dict[str, float]:
        # the release's nn.Conv2d classifiers and dilated convolutions
        with aspp_impl("conv"), dilated_impl("native"):
            return self._step(src, tgt, i)

    def _step(self, src: dict, tgt: dict, i: int) -> dict[str, float]:
        net = self.net.train()
        optim.set_lr(self.optimizer, optim.poly_lr(i, self.cfg.lr, self.cfg.iters))
        self.optimizer.zero_grad(set_to_none=True)
        seg = src["seg"]  # (B, 3, T, H, W)
        with self.autocast():
            unused = net(seg[:, :, -2])  # quirk 7: with autograd; graph alive to the end  # noqa: F841
            l_seg = _seg_ce(net(seg[:, :, -1]), src["label"])
        l_seg.backward()
        with self.autocast():
            lp, lc = net(tgt["seg"][:, :, -2]), net(tgt["seg"][:, :, -1])
            l_sfc = release_sfc_loss(lp, lc, tgt["flow"][:, :, -2], tgt["flow"][:, :, -1],
                                     self.flownet_global, self.sfm, scale=self.cfg.scale)
        (self.cfg.sfc_weight * l_sfc).backward()  # also fills the SFM's .grad (never applied)
        self.optimizer.step()
        return {"seg": float(l_seg.detach()), "sfc": float(l_sfc.detach())}


class ReleaseSFM:
    """SFM pre-training as the release ran it, on deep copies of a project `SFMStage`."""

    kind = "sfm"

    def __init__(self, stage):
        cfg = stage.cfg
        self.cfg, self.autocast = cfg, stage.autocast
        self.sfm = copy.deepcopy(stage.nets["sfm"])
        self.flownet_global = _unfrozen_copy(stage.nets["flownet_global"])
        self.optimizer = optim.make_adam(self.sfm.parameters(), lr=cfg.lr,
                                         weight_decay=cfg.weight_decay)

    def sync_from(self, stage) -> None:
        """Copy the project stage's SFM and Adam state (identical start for the next step)."""
        self.sfm.load_state_dict(stage.nets["sfm"].state_dict())
        self.optimizer.load_state_dict(stage.optimizer.state_dict())

    def step(self, src: dict, tgt: dict | None = None, i: int = 0) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        f = src["flow"]
        with self.autocast():
            loss = release_sfm_loss(f[:, :, -2], f[:, :, -1], src["label_prev"], src["label"],
                                    self.flownet_global, self.sfm, src["label_down4x"],
                                    num_classes=self.cfg.num_classes)
        loss.backward()
        self.optimizer.step()
        return {"sfm": float(loss.detach())}


REFERENCES = {"segnet_sfc": ReleaseSegNetSFC, "sfm": ReleaseSFM}
