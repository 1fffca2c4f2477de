"""The demo's gallery: what the networks see and predict on a few target-val frames.

For each frame t (a Cityscapes-Seq-layout val clip t-2, t-1, t) one row of six panels:
the frame, its label, the source-only Accel's prediction (FlowNet_pretrain stage two), the SFC
Accel's prediction (SFC stage two), the optical flow of flownet_global (the stage-two FlowNet)
on (t, t-1), and the segmentation-based flow: the SFM (SFM stage) applied to the soft masks
(scale 100) of the SFC Accel's predictions for t-1 and t, and the true flow (the synthetic
target's ground truth: minus the forward flow t-1 → t; invalid pixels drawn as no motion).
The three flows are drawn on one colour scale (white = no motion). Every model is the
run's ``best.pt``.

Writes ``<out>/gallery/frame_*.png`` (one per frame, with titles), ``gallery.png`` (all rows),
``predict.gif`` (a val snippet as `python -m sfc.predict` segments it: frame | source-only
Accel | SFC Accel, streaming) and ``index.html``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch

from sfc import vis
from sfc.data import make_dataset
from sfc.data.classes import get_protocol
from sfc.data.flow_io import resize_flow
from sfc.evaluate.checkpoint import build_model, inspect_checkpoint
from sfc.losses import segmentation_based_flow, soft_masks
from sfc.models import Accel, FlowNetS

NUM_CLASSES = {"viper": 15, "synthia_seq": 12}
SO_ACCEL, SFC_ACCEL = "FlowNet_pretrain/stage_two/train", "SFC/stage_two/train"
SFM_RUN = "SFM/train"
TITLES = ["frame t", "label", "source-only Accel", "SFC Accel", "optical flow (FlowNet)",
          "seg.-based flow (SFM)", "true flow"]
PANEL_W = 256  # panels are enlarged (nearest) to this width for viewing


def _model_state(path: Path) -> dict:
    """All tensors of a checkpoint as one flat state dict. Run checkpoints
    (``{"models": {net: state}}``) become ``"net.key"``; ``{"model": state}`` and bare state
    dicts are taken as they are."""
    if not path.is_file():
        raise FileNotFoundError(f"gallery: checkpoint {path} is missing (did its stage run?)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("models"), dict):
        return {f"{net}.{k}": v for net, sd in ckpt["models"].items() for k, v in sd.items()}
    return ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt


def _prefix_of(state: dict, key: str, prefer: str = "") -> str:
    """The prefix p with ``p + key`` in ``state`` (preferring one containing ``prefer``)."""
    prefixes = [k[: -len(key)] for k in state if k.endswith(key)]
    if not prefixes:
        raise KeyError(f"no parameter ending in {key!r} in the checkpoint")
    preferred = [p for p in prefixes if prefer and prefer in p]
    return min(preferred or prefixes, key=len)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_accel(path: Path) -> Accel:
    """An Accel from a run checkpoint (size read off the weights, as `sfc.evaluate` does)."""
    info = inspect_checkpoint(path, "accel")
    return build_model(info).eval()


def load_flownet(path: Path, prefer: str) -> FlowNetS:
    """A FlowNetS from a checkpoint: the sub-network whose key prefix contains ``prefer``
    (e.g. "flownet." inside an Accel, "sfm" inside the SFM run), or the bare network."""
    state = _model_state(path)
    prefix = _prefix_of(state, "conv1.0.weight", prefer)
    net = FlowNetS()
    net.load_state_dict(_strip(state, prefix), strict=True)
    return net.eval()


def _enlarge(img: np.ndarray, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    return vis.resize_nearest(img, (width, max(1, round(h * width / w))))


@torch.no_grad()
def frame_panels(item: dict, so: Accel, sfc: Accel, flownet_global: FlowNetS, sfm: FlowNetS,
                 palette: np.ndarray) -> tuple[list[np.ndarray], float]:
    """The six panels of one 3-frame target clip (frames t-2, t-1, t), and the flow magnitude
    drawn fully saturated (pixels of the 1/4 grid)."""
    seg, flow = item["seg"][None], item["flow"][None]  # (1, 3, 3, H, W)
    size = seg.shape[-2:]
    so_logits = so(seg[:, :, 1:], flow[:, :, 1:])  # frame t from clip (t-1, t)
    sfc_cur = sfc(seg[:, :, 1:], flow[:, :, 1:])
    sfc_prev = sfc(seg[:, :, :2], flow[:, :, :2])  # frame t-1 from clip (t-2, t-1)
    img_prev, img_cur = flow[:, :, 1], flow[:, :, 2]
    of = flownet_global(torch.cat((img_cur, img_prev), 1))[0]  # (2, H/4, W/4), 1/4-grid pixels
    sf = segmentation_based_flow(soft_masks(sfc_prev, size, 100.0),
                                 soft_masks(sfc_cur, size, 100.0), img_prev, img_cur, sfm)[0]
    # the ground truth: minus the true forward flow t-1 → t (the backward flow t → t-1 up to
    # where the motion is not a translation), at the 1/4 grid like the networks' flows
    fw = item["flow_gt"][1].permute(1, 2, 0).numpy()  # (H, W, 2), full-res px, NaN invalid
    grid = tuple(of.shape[-1:-3:-1])  # (W/4, H/4)
    gt = -torch.from_numpy(np.nan_to_num(resize_flow(fw, grid))).permute(2, 0, 1)
    mag = max(float(of.norm(dim=0).max()), float(sf.norm(dim=0).max()),
              float(gt.norm(dim=0).max()), 1e-6)
    panels = [vis.denormalize_seg(seg[0, :, 2]), vis.colorize(item["label"], palette),
              vis.colorize(so_logits.argmax(1)[0], palette),
              vis.colorize(sfc_cur.argmax(1)[0], palette),
              *vis.flows_to_rgb([of, sf, gt])]
    h, w = panels[0].shape[:2]
    panels = [vis.resize_nearest(p, (w, h)) for p in panels]  # flows: 1/4 grid -> frame size
    return [_enlarge(p, PANEL_W) for p in panels], mag


GIF_PANEL_W = 192


def make_animation(predicted: dict, dest: Path) -> int:
    """`predict.gif` from the outputs of `python -m sfc.predict` (sfc.demo.evals): per frame
    the input, the source-only and the SFC Accel's colour prediction. Returns the frame count."""
    from PIL import Image

    outs = predicted["outputs"]
    names = json.loads((outs["sfc"] / "predict.json").read_text())["names"]
    files = {p.stem: p for p in Path(predicted["frames"]).iterdir()}
    frames = []
    for name in names:
        panels = [np.asarray(Image.open(files[name]).convert("RGB"))]
        panels += [np.asarray(Image.open(outs[k] / "color" / f"{name}.png").convert("RGB"))
                   for k in ("source_only", "sfc")]
        panels = [_enlarge(vis.resize_nearest(p, panels[0].shape[1::-1]), GIF_PANEL_W)
                  for p in panels]
        row = vis.side_by_side(panels, ["target frame", "source-only Accel", "SFC Accel"])
        frames.append(Image.fromarray(row).convert("P", palette=Image.ADAPTIVE))
    frames[0].save(dest, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return len(frames)


def _index_html(names: list[str], protocol, animation: str | None = None) -> str:
    legend = "".join(
        f'<span style="display:inline-block;margin:2px 8px 2px 0"><span style="display:'
        f'inline-block;width:12px;height:12px;background:rgb{tuple(int(c) for c in col)};'
        f'border:1px solid #888"></span> {html.escape(n)}</span>'
        for n, col in zip(protocol.class_names, protocol.palette))
    rows = "".join(f'<h3>{html.escape(n)}</h3><img src="{html.escape(f)}">\n'
                   for n, f in names)
    return ("<!doctype html><meta charset='utf-8'><title>SFC demo gallery</title>"
            "<style>body{font-family:sans-serif;margin:20px}img{image-rendering:pixelated;"
            "max-width:100%}</style><h1>SFC demo gallery</h1>"
            f"<p>Columns: {' | '.join(map(html.escape, TITLES))}. Predictions are of frame t; "
            "the three flows (FlowNet, SFM, ground truth) share one colour scale per frame "
            "(hue = direction, saturation = magnitude up to the 'max' in the title, in pixels "
            "of the 1/4 grid; white = no motion). Black in the label = ignored pixels.</p>"
            f"<p>{legend}</p>"
            + ("<h2>A val snippet, segmented streaming by python -m sfc.predict</h2>"
               f"<img src='{animation}'>\n" if animation else "")
            + f"<h2>All frames</h2><img src='gallery.png'>\n{rows}")


def make_gallery(out: Path, source: str, target_size, n_frames: int, threads: int = 2,
                 predicted: dict | None = None) -> dict:
    """Draw the gallery into ``<out>/gallery``; returns the written paths, relative to ``out``."""
    torch.set_num_threads(threads)
    protocol = get_protocol(NUM_CLASSES[source])
    runs = out / "runs" / source
    so = load_accel(runs / SO_ACCEL / "best.pt")
    sfc = load_accel(runs / SFC_ACCEL / "best.pt")
    flownet_global = load_flownet(runs / SO_ACCEL / "best.pt", "accel.flownet.")
    sfm = load_flownet(runs / SFM_RUN / "best.pt", "sfm.")
    ds = make_dataset("cityscapes", out / "data", split="val", frames=3,
                      size=tuple(target_size), classes=protocol.num_classes, gt_flow=True)
    picks = sorted({int(i) for i in np.linspace(0, len(ds) - 1, min(n_frames, len(ds)))})
    gallery = out / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    for i in picks:
        item = ds[i]
        panels, mag = frame_panels(item, so, sfc, flownet_global, sfm, protocol.palette)
        titles = [*TITLES[:4], *(f"{t}, max {mag:.2g}" for t in TITLES[4:])]
        fname = f"frame_{item['name']}.png"
        vis.save_png(vis.side_by_side(panels, titles), gallery / fname)
        rows.append(vis.side_by_side(panels, titles))
        files.append((item["name"], fname))
    vis.save_png(vis.stack_rows(rows), gallery / "gallery.png")
    animation = None
    if predicted is not None:
        make_animation(predicted, gallery / "predict.gif")
        animation = "predict.gif"
    (gallery / "index.html").write_text(_index_html(files, protocol, animation))
    result = {"index": "gallery/index.html", "combined": "gallery/gallery.png",
              "frames": [f"gallery/{f}" for _, f in files]}
    if animation:
        result["animation"] = f"gallery/{animation}"
    return result
