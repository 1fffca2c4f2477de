"""Optical flow against ground truth (docs/flow.md): average end-point error, Fl-all, and the
zero-flow baseline, on the valid pixels of a flow set (``sfc.data.flowsets``).

For each pair the FlowNetS runs on ``cat[img1, img2]`` at the item's size; its 1/4-grid flow
is upsampled bilinearly (``align_corners=False``) to that size and scaled to its pixels, and
compared with the ground truth there. Over every valid pixel of the whole set (pixel-weighted,
as KITTI counts Fl-all):

* EPE: mean of ‖pred − gt‖₂ (pixels of the evaluated size);
* Fl-all: the fraction of outliers, EPE > 3 px **and** > 5 % of ‖gt‖ (KITTI 2015);
* the zero-flow baseline: the same two numbers for a prediction of 0 (EPE = mean ‖gt‖);
  a FlowNet that has learnt nothing about motion cannot beat it.
"""

from __future__ import annotations

import itertools

import torch
from tqdm import tqdm

from sfc import dist
from sfc.evaluate.temporal import upsample_flow

FL_ABS, FL_REL = 3.0, 0.05  # KITTI outlier: EPE > 3 px and > 5 % of the true magnitude
HIST_BINS, HIST_MAX = 8192, 512.0  # |gt| histogram for its percentiles: 1/16 px bins


def flow_error_sums(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """pred, gt `B×2×H×W` (gt NaN where invalid) → float64 tensor (5,): valid pixels, Σ EPE,
    Σ zero-flow EPE (= Σ ‖gt‖), outliers, zero-flow outliers."""
    if pred.shape != gt.shape:
        raise ValueError(f"flow_error_sums: pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}")
    valid = torch.isfinite(gt).all(dim=1)  # (B, H, W)
    g = torch.nan_to_num(gt.double(), nan=0.0, posinf=0.0, neginf=0.0)
    err = torch.linalg.vector_norm(pred.double() - g, dim=1)
    mag = torch.linalg.vector_norm(g, dim=1)
    out = valid & (err > FL_ABS) & (err > FL_REL * mag)
    out0 = valid & (mag > FL_ABS)  # the zero prediction's error is ‖gt‖ (> 5 % of itself)
    return torch.stack([valid.sum().double(), err[valid].sum(), mag[valid].sum(),
                        out.sum().double(), out0.sum().double()])


def magnitude_histogram(gt: torch.Tensor) -> torch.Tensor:
    """(HIST_BINS,) float64 counts of ‖gt‖ over the valid pixels (bins of HIST_MAX / HIST_BINS
    px; larger magnitudes land in the last bin)."""
    valid = torch.isfinite(gt).all(dim=1)
    mag = torch.linalg.vector_norm(gt.double(), dim=1)[valid].clamp(max=HIST_MAX - 1e-6)
    return torch.histc(mag, bins=HIST_BINS, min=0.0, max=HIST_MAX).double()


def percentile(hist: torch.Tensor, q: float) -> float:
    """The q-th percentile of a magnitude histogram (upper edge of the bin it falls in)."""
    c = torch.cumsum(hist, 0)
    if c[-1] <= 0:
        return float("nan")
    i = int(torch.searchsorted(c, torch.tensor(q / 100.0 * float(c[-1]), dtype=c.dtype)))
    return (min(i, HIST_BINS - 1) + 1) * HIST_MAX / HIST_BINS


def summarise(sums: torch.Tensor, hist: torch.Tensor | None = None) -> dict:
    n = max(float(sums[0]), 1.0)
    out = {"epe": float(sums[1]) / n, "epe_zero": float(sums[2]) / n,
           "fl_all": float(sums[3]) / n, "fl_all_zero": float(sums[4]) / n,
           "valid_pixels": int(sums[0])}
    if hist is not None:  # the ground truth's |flow|: mean (= the zero baseline), percentiles
        out["gt_magnitude"] = {"mean": out["epe_zero"], "p50": percentile(hist, 50),
                               "p95": percentile(hist, 95)}
    return out


@torch.no_grad()
def evaluate_flow(flownet, loader, device="cpu", limit: int | None = None,
                  progress: bool = True, amp: str | None = None) -> dict:
    """EPE / Fl-all / zero baseline of `flownet` over a loader of flow pairs. Returns
    {"epe", "epe_zero", "fl_all", "fl_all_zero" (fractions), "valid_pixels", "num_pairs"},
    summed over all processes."""
    from sfc.evaluate.core import _autocast  # one autocast helper for every evaluation

    device = torch.device(device)
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    hist = torch.zeros(HIST_BINS, dtype=torch.float64, device=device)
    seen = 0
    was = flownet.training
    flownet.eval()
    total = len(loader) if hasattr(loader, "__len__") else None
    if limit is not None:  # the batches that hold the first `limit` pairs, no more reads
        total = -(-limit // (getattr(loader, "batch_size", None) or 1))
        loader = itertools.islice(loader, total)
    bar = tqdm(dist.agreed(loader), total=total, desc="eval flow", leave=False,
               dynamic_ncols=True, disable=not (progress and dist.is_main()))
    for batch in bar:  # no break: every process reaches the agreement at the loop's end
        if limit is not None and seen >= limit:
            continue
        img1 = batch["img1"].to(device, non_blocking=True)  # (B, 3, H, W)
        img2 = batch["img2"].to(device, non_blocking=True)
        gt = batch["flow_gt"].to(device, non_blocking=True)  # (B, 2, H, W), NaN invalid
        if limit is not None and seen + img1.shape[0] > limit:
            keep = limit - seen
            img1, img2, gt = img1[:keep], img2[:keep], gt[:keep]
        with _autocast(device, amp):
            flow = flownet(torch.cat((img1, img2), 1))  # (B, 2, H/4, W/4), 1/4-grid px
        sums += flow_error_sums(upsample_flow(flow.float(), gt.shape[-2:]), gt)
        hist += magnitude_histogram(gt)
        seen += img1.shape[0]
    bar.close()
    flownet.train(was)
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(hist)
    n = dist.all_reduce_sum(torch.tensor([seen], dtype=torch.int64, device=device))
    return {**summarise(sums.cpu(), hist.cpu()), "num_pairs": int(n.item())}


FLOW_CSV_COLUMNS = ("checkpoint", "network", "flow_set", "split", "width", "height",
                    "num_pairs", "valid_pixels", "epe", "epe_zero", "fl_all", "fl_all_zero")


def flow_record(res: dict, checkpoint: str, network: str, flow_set: str, split: str,
                size) -> dict:
    """The JSON record of one flow evaluation (EPE in pixels of ``size``, Fl-all fractions)."""
    return {"checkpoint": checkpoint, "network": network, "flow_set": flow_set, "split": split,
            "size": list(size) if size else None, **res,
            "units": {"epe": "pixels of the evaluated size", "fl_all": "fraction"}}


def format_flow_table(rec: dict) -> str:
    size = "the files' own size" if not rec["size"] else f"{rec['size'][0]}x{rec['size'][1]}"
    lines = [f"Optical flow on {rec['flow_set']} ({rec['split']}), {rec['num_pairs']} pairs, "
             f"{rec['valid_pixels']} valid pixels, at {size}",
             f"network: {rec['network']}",
             f"{'':<22}{'EPE (px)':>10}{'Fl-all (%)':>12}",
             f"{'FlowNetS':<22}{rec['epe']:>10.3f}{100 * rec['fl_all']:>12.2f}",
             f"{'zero flow (baseline)':<22}{rec['epe_zero']:>10.3f}"
             f"{100 * rec['fl_all_zero']:>12.2f}",
             f"EPE / zero baseline: {rec['epe'] / max(rec['epe_zero'], 1e-12):.3f} "
             "(below 1: the network measures motion)"]
    m = rec.get("gt_magnitude")
    if m:
        lines.append(f"ground truth |flow|: mean {m['mean']:.2f} px, median {m['p50']:.2f}, "
                     f"95th percentile {m['p95']:.2f} (1/16 px bins)")
    return "\n".join(lines)


def write_flow_csv(path: str, records: list[dict]) -> None:
    import csv
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FLOW_CSV_COLUMNS)
        for r in records:
            size = r["size"] or ["", ""]
            w.writerow([r["checkpoint"], r["network"], r["flow_set"], r["split"], size[0],
                        size[1], r["num_pairs"], r["valid_pixels"], f"{r['epe']:.6f}",
                        f"{r['epe_zero']:.6f}", f"{r['fl_all']:.6f}", f"{r['fl_all_zero']:.6f}"])


def run_flow(args, device) -> dict:
    """``python -m sfc.evaluate --flow``: one FlowNetS on one flow set (table, JSON, CSV)."""
    from torch.utils.data import Subset

    from sfc.data.flowsets import DEFAULT_SIZES, DEFAULT_SPLITS, make_flow_set
    from sfc.evaluate.checkpoint import load_flownet
    from sfc.evaluate.data import make_eval_loader

    net, which = load_flownet(args.checkpoint, args.flow_network)
    size = tuple(args.size) if args.size else DEFAULT_SIZES[args.flow_set]
    split = args.split or DEFAULT_SPLITS[args.flow_set]
    ds = make_flow_set(args.flow_set, args.data, split=split, size=size)
    if args.limit is not None:
        ds = Subset(ds, range(min(args.limit, len(ds))))
    loader = make_eval_loader(ds, batch_size=args.batch_size, num_workers=args.workers,
                              pin_memory=device.type == "cuda")
    res = evaluate_flow(net.to(device), loader, device=device, progress=not args.no_progress,
                        amp=args.amp)
    return flow_record(res, str(args.checkpoint), which, args.flow_set, split, size)
