"""TensorBoard pictures drawn at each evaluation, from the first validation sample.

* segnet / accel: input frame | colourised prediction | colourised label; then the flow
  (flownet_global for SFC stage one, Accel's FlowNet for stage two) and, for SFC stages, the
  segmentation-based flow from the prediction's soft masks (same colour scale).
* sfm: the segmentation-based flow from the ground-truth masks | flownet_global's flow.
* flownet: the FlowNetS's flow | the ground truth (Flying Chairs val).
"""

from __future__ import annotations

import numpy as np
import torch

from sfc import losses, vis
from sfc.evaluate.temporal import upsample_flow


def _flows(a: torch.Tensor, b: torch.Tensor) -> list[np.ndarray]:
    """Two flows `2×h×w` on one colour scale."""
    return vis.flows_to_rgb([a, b])


@torch.no_grad()
def draw(stage, batch: dict, palette) -> dict[str, np.ndarray]:
    """`batch`: a collated validation batch (first sample used) on the stage's device."""
    nets = stage.nets
    was = {k: n.training for k, n in nets.items()}
    for n in nets.values():
        n.eval()
    try:
        return _draw(stage, batch, palette)
    finally:
        for k, n in nets.items():
            n.train(was[k])


def _draw(stage, batch, palette) -> dict[str, np.ndarray]:
    if stage.kind == "flownet":  # Flying Chairs: predicted | ground-truth flow, one scale
        x = torch.cat((batch["img1"][:1], batch["img2"][:1]), 1)
        gt = torch.nan_to_num(batch["flow_gt"][0].float())
        pred = upsample_flow(stage.nets["flownet"](x).float(), gt.shape[-2:])[0]
        return {"flow/pred|gt": vis.side_by_side(_flows(pred, gt), ["FlowNetS", "ground truth"])}
    f = batch["flow"][:1]  # (1, 3, T, H, W) flow-normalised
    img_prev, img_cur = f[:, :, -2], f[:, :, -1]
    if stage.kind == "sfm":
        c = int(max(batch["label"].max(), batch["label_prev"].max(), 0)) + 1
        m_prev = losses.one_hot_masks(batch["label_prev"][:1], c)
        m_cur = losses.one_hot_masks(batch["label"][:1], c)
        present = (m_prev.flatten(2).amax(2) + m_cur.flatten(2).amax(2)) > 0
        sf = losses.segmentation_based_flow(m_prev, m_cur, img_prev, img_cur, stage.nets["sfm"],
                                            present=present)[0]
        of = losses.global_flow(stage.nets["flownet_global"], img_prev, img_cur)[0]
        return {"flow/SF_gt|OF": vis.side_by_side(_flows(sf.float(), of.float()),
                                                  ["SF (GT masks)", "flownet_global"])}
    one = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()}
    logits = stage.predict_logits(one)  # (1, C, h, w)
    label = one["label"][0]
    up = torch.nn.functional.interpolate(logits.float(), size=tuple(label.shape),
                                         mode="bilinear", align_corners=False)
    pred = up.argmax(1)[0]
    out = {"pred|label": vis.side_by_side(
        [vis.denormalize_seg(one["seg"][0, :, -1]), vis.colorize(pred, palette),
         vis.colorize(label, palette)], ["frame f", "prediction", "label"])}
    if stage.kind == "accel":
        flow = stage.nets["accel"].flownet(torch.cat((img_cur, img_prev), 1))[0]
    elif "flownet_global" in stage.nets:
        flow = losses.global_flow(stage.nets["flownet_global"], img_prev, img_cur)[0]
    else:
        return out
    if "sfm" in stage.nets:
        if stage.kind == "accel":
            # validation clips hold (f-1, f): frame f-1 from the update branch alone
            lc, lp = logits, stage.nets["accel"].net_update(one["seg"][:, :, -2])
        else:
            lp, lc = stage.sf_logits_pair(one)
        size = img_cur.shape[-2:]
        sf = losses.segmentation_based_flow(
            losses.soft_masks(lp, size, stage.cfg.scale), losses.soft_masks(lc, size,
                                                                            stage.cfg.scale),
            img_prev, img_cur, stage.nets["sfm"])[0]
        out["flow/SF|OF"] = vis.side_by_side(_flows(sf.float(), flow.float()),
                                             ["segmentation-based flow", "optical flow"])
    else:
        out["flow/OF"] = vis.flow_to_rgb(flow.float())
    return out

