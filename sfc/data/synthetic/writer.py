"""Synthetic VIPER / Cityscapes-Seq / SYNTHIA-Seq trees in the real on-disk layouts.

    python -m sfc.data.synthetic --out data            # the demo's tree, a few seconds
    python -m sfc.data.synthetic --out DIR --native    # frames at 1920×1080 / 2048×1024 / 1280×760
    python -m sfc.data.synthetic --flying-chairs DIR --count 2000   # a synthetic Flying Chairs

From Python (tests, demo): ``generate(out_dir, seed=0, tiny=True)`` writes a tiny tree in well
under a second. Same seed -> byte-identical files. Formats are the real ones: VIPER JPEG images
and palette PNG labels (index = VIPER id, every frame labelled, annotated = multiples of 10),
Cityscapes PNG sequence frames + 8-bit ``gtFine_labelIds`` for the frame ``…_000019``, SYNTHIA
8-bit RGB PNGs + 16-bit 3-channel label PNGs (class id in R, instance ids in G/B). Ground-truth
forward flow t → t+1 (NaN where occluded or out of frame, docs/flow.md): VIPER's own
``flow/SSS/SSS_NNNNN.npz`` (float16 ``u``, ``v``) and, for the target, Middlebury ``.flo`` in
``Cityscapes/flow_synthetic/<split>/<city>/<city>_<seq>_<frame>_flow.flo`` (synthetic only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from sfc.data.cityscapes import CS_FLOW_DIR
from sfc.data.flow_io import write_flo, write_viper_flow
from sfc.data.synthetic.chairs import CHAIRS_SIZE, VAL_EVERY, write_flying_chairs
from sfc.data.synthetic.scene import CANON, Scene, forward_flow
from sfc.data.synthetic.styles import (
    CITYSCAPES_IDS,
    CITYSCAPES_STYLE,
    SYNTHIA_IDS,
    SYNTHIA_STYLE,
    VIPER_IDS,
    VIPER_STYLE,
)

DATASETS = ("viper", "cityscapes", "synthia_seq")
SIZES = {"viper": (256, 144), "cityscapes": (256, 128), "synthia_seq": (160, 95)}
NATIVE_SIZES = {"viper": (1920, 1080), "cityscapes": (2048, 1024), "synthia_seq": (1280, 760)}
TINY_SIZES = {"viper": (96, 54), "cityscapes": (96, 48), "synthia_seq": (64, 38)}
DEFAULTS = dict(viper_seqs=6, viper_val_seqs=2, frames_per_seq=41, viper_first_frame=0,
                cs_train=24, cs_val=12, cs_context=3, cs_val_frames=30, synthia_frames=60)
TINY = dict(viper_seqs=2, viper_val_seqs=1, frames_per_seq=21, viper_first_frame=0,
            cs_train=3, cs_val=2, cs_context=2, cs_val_frames=30, synthia_frames=12)
CS_SNIPPET = 30  # real Cityscapes-Seq snippets: 30 frames, the 20th (index 19) labelled
TRAIN_CITIES, VAL_CITIES = ("aachen", "bochum", "bremen"), ("frankfurt", "lindau", "munster")


def _lut(ids: dict[str, int]) -> np.ndarray:
    return np.array([ids[n] for n in CANON], np.uint8)  # canonical class -> dataset id


def _rngs(seed: int, *key: int):
    """(scene rng, noise rng factory) for one video, independent of what else is written."""
    return np.random.default_rng([seed, *key]), lambda t: np.random.default_rng([seed, *key, t])


def _viper_palette() -> list[int]:
    rng = np.random.default_rng(1234)
    pal = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    pal[0] = 0
    return pal.flatten().tolist()


def _frames(scene: Scene, span, size, style, noise):
    """Yield (t, canvas, rgb, flow of the previous frame t-1 → t or None) along ``span``."""
    prev = None
    for t in span:
        cv = scene.paint(t, size[0], size[1], style)
        flow = forward_flow(prev, cv) if prev is not None else None
        rgb = scene.shade(cv, style, noise(t))
        yield t, cv, rgb, flow
        prev = cv


def write_viper(out: Path, seed: int, size, seqs: int, val_seqs: int, frames: int,
                first: int, bar, flow: bool = True) -> int:
    """VIPER train/val sequences; with ``flow``, the forward flow t → t+1 of every frame but
    the last in VIPER's format (``flow/SSS/SSS_NNNNN.npz``)."""
    lut, pal, n = _lut(VIPER_IDS), _viper_palette(), 0
    for si, (split, count) in enumerate((("train", seqs), ("val", val_seqs))):
        for k in range(count):
            seq = f"{k + 1:03d}"
            scene_rng, noise = _rngs(seed, 0, si, k)
            scene = Scene(scene_rng, ego="ego", riders=False)
            for d in ("img", "cls") + (("flow",) if flow else ()):
                (out / split / d / seq).mkdir(parents=True, exist_ok=True)
            for t, cv, rgb, fl in _frames(scene, range(first, first + frames), size,
                                          VIPER_STYLE, noise):
                Image.fromarray(rgb).save(out / split / "img" / seq / f"{seq}_{t:05d}.jpg",
                                          quality=92)
                lab = Image.fromarray(lut[cv.cls])
                lab.putpalette(pal)  # mode 'P', index = VIPER id
                lab.save(out / split / "cls" / seq / f"{seq}_{t:05d}.png")
                if flow and fl is not None:
                    write_viper_flow(out / split / "flow" / seq / f"{seq}_{t - 1:05d}.npz", fl)
                n += 1
                bar.update()
    return n


def write_cityscapes(out: Path, seed: int, size, n_train: int, n_val: int, context: int,
                     bar, val_frames: int = CS_SNIPPET, flow: bool = True) -> int:
    """Train snippets: the `context` frames before the annotated one and it; val snippets:
    `val_frames` frames from the first (the real ones: 30, frames 0..29, the 20th labelled), so
    that keyframe distances up to 19 and temporal consistency can be evaluated. With ``flow``,
    the forward flow t → t+1 of every frame but a snippet's last, as Middlebury ``.flo`` in
    ``flow_synthetic/`` (synthetic only: real Cityscapes has no ground-truth flow)."""
    lut, n, f = _lut(CITYSCAPES_IDS), 0, 19  # annotated: the 20th frame of a snippet
    for si, (split, count, cities) in enumerate((("train", n_train, TRAIN_CITIES),
                                                 ("val", n_val, VAL_CITIES))):
        if split == "train":
            span = range(f - context, f + 1)
        elif val_frames >= f + 1:
            span = range(0, val_frames)
        else:  # a shorter snippet ends at the labelled frame
            span = range(f + 1 - val_frames, f + 1)
        for k in range(count):
            city, seq = cities[k % len(cities)], f"{k // len(cities):06d}"
            scene_rng, noise = _rngs(seed, 1, si, k)
            scene = Scene(scene_rng, ego="ego")
            img_dir = out / "leftImg8bit_sequence" / split / city
            gt_dir = out / "gtFine" / split / city
            flow_dir = out / CS_FLOW_DIR / split / city
            for d in (img_dir, gt_dir) + ((flow_dir,) if flow else ()):
                d.mkdir(parents=True, exist_ok=True)
            for t, cv, rgb, fl in _frames(scene, span, size, CITYSCAPES_STYLE, noise):
                Image.fromarray(rgb).save(img_dir / f"{city}_{seq}_{t:06d}_leftImg8bit.png",
                                          compress_level=1)  # fast zlib level, same format
                if t == f:
                    Image.fromarray(lut[cv.cls]).save(gt_dir / f"{city}_{seq}_{t:06d}"
                                                      "_gtFine_labelIds.png")
                if flow and fl is not None:
                    write_flo(flow_dir / f"{city}_{seq}_{t - 1:06d}_flow.flo", fl)
                n += 1
                bar.update()
    return n


def write_synthia(out: Path, seed: int, size, frames: int, layout: str, bar) -> int:
    rgb_dir, lab_dir = ((out / "RGB/Stereo_Left/Omni_F", out / "GT/LABELS/Stereo_Left/Omni_F")
                        if layout == "original" else (out / "rgb", out / "label"))
    rgb_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    lut = _lut(SYNTHIA_IDS).astype(np.uint16)
    scene_rng, noise = _rngs(seed, 2, 0, 0)
    scene = Scene(scene_rng, ego=None)
    for t in range(frames):
        cls, inst, rgb = scene.render(t, size[0], size[1], SYNTHIA_STYLE, noise(t))
        Image.fromarray(rgb).save(rgb_dir / f"{t:06d}.png", compress_level=1)
        ids = lut[cls]
        # OpenCV writes BGR: B, G = instance-like junk (nonzero, as in the real files), R = class
        junk = (inst.astype(np.uint32) * 97 + ids * 1000 + 1).astype(np.uint16)
        cv2.imwrite(str(lab_dir / f"{t:06d}.png"), np.dstack([junk, inst, ids]))
        bar.update()
    return frames


def generate(out_dir, seed: int = 0, datasets=DATASETS, native: bool = False, tiny: bool = False,
             sizes: dict | None = None, synthia_layout: str = "original", progress: bool = False,
             flow: bool = True, **counts) -> dict[str, int]:
    """Write the synthetic trees under ``out_dir`` (``VIPER/``, ``Cityscapes/``,
    ``SynthiaSeq/SEQS-04-DAWN/``); returns the number of frames written per dataset. With
    ``flow`` (default) the ground-truth forward flow of VIPER (``flow/``, VIPER's ``.npz``) and
    of the Cityscapes-layout target (``flow_synthetic/``, ``.flo``) is written too.

    ``counts`` override the defaults (``DEFAULTS``, or ``TINY`` with ``tiny=True``): viper_seqs,
    viper_val_seqs, frames_per_seq, viper_first_frame, cs_train, cs_val, cs_context,
    cs_val_frames, synthia_frames. ``sizes`` maps a dataset name to (W, H).
    """
    unknown = set(counts) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown generate() arguments {sorted(unknown)}")
    bad = set(datasets) - set(DATASETS)
    if bad:
        raise ValueError(f"unknown datasets {sorted(bad)}; expected some of {DATASETS}")
    if synthia_layout not in ("original", "flat"):
        raise ValueError(f"synthia_layout must be 'original' or 'flat', got {synthia_layout!r}")
    c = {**(TINY if tiny else DEFAULTS), **counts}
    sz = {**(NATIVE_SIZES if native else TINY_SIZES if tiny else SIZES), **(sizes or {})}
    out = Path(out_dir)
    total = (c["frames_per_seq"] * (c["viper_seqs"] + c["viper_val_seqs"]) * ("viper" in datasets)
             + ((c["cs_context"] + 1) * c["cs_train"] + c["cs_val_frames"] * c["cs_val"])
             * ("cityscapes" in datasets)
             + c["synthia_frames"] * ("synthia_seq" in datasets))
    written = {}
    with tqdm(total=total, desc="synthetic frames", disable=not progress) as bar:
        if "viper" in datasets:
            written["viper"] = write_viper(out / "VIPER", seed, sz["viper"], c["viper_seqs"],
                                           c["viper_val_seqs"], c["frames_per_seq"],
                                           c["viper_first_frame"], bar, flow)
        if "cityscapes" in datasets:
            written["cityscapes"] = write_cityscapes(out / "Cityscapes", seed, sz["cityscapes"],
                                                     c["cs_train"], c["cs_val"], c["cs_context"],
                                                     bar, c["cs_val_frames"], flow)
        if "synthia_seq" in datasets:
            written["synthia_seq"] = write_synthia(out / "SynthiaSeq" / "SEQS-04-DAWN", seed,
                                                   sz["synthia_seq"], c["synthia_frames"],
                                                   synthia_layout, bar)
    return written


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sfc.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="data root to write (VIPER/, Cityscapes/, ...)")
    p.add_argument("--flying-chairs", metavar="DIR",
                   help="instead: write a synthetic Flying Chairs set in the real layout under "
                        "DIR (FlyingChairs_release/data/, FlyingChairs_train_val.txt)")
    p.add_argument("--count", type=int, default=2000, help="--flying-chairs: samples (2000)")
    p.add_argument("--chairs-size", type=_size, default=CHAIRS_SIZE, metavar="WxH",
                   help="--flying-chairs: image size (default 512x384, the real one)")
    p.add_argument("--no-flow", dest="flow", action="store_false",
                   help="skip the ground-truth flow files")
    p.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS,
                   help="which trees to write")
    p.add_argument("--native", action="store_true",
                   help="write at the real sizes 1920x1080 / 2048x1024 / 1280x760")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny preset")
    p.add_argument("--synthia-layout", choices=("original", "flat"), default="original",
                   help="SYNTHIA folders: RGB/Stereo_Left/Omni_F (original) or rgb/ + label/")
    for ds in DATASETS:
        p.add_argument(f"--{ds.replace('_', '-')}-size", type=_size, metavar="WxH",
                       help=f"{ds} frame size (default {SIZES[ds][0]}x{SIZES[ds][1]})")
    p.add_argument("--viper-seqs", type=int, help="VIPER train sequences (default 6)")
    p.add_argument("--viper-val-seqs", type=int, help="VIPER val sequences (default 2)")
    p.add_argument("--frames-per-seq", type=int, help="VIPER frames per sequence (default 41)")
    p.add_argument("--viper-first-frame", type=int, help="first VIPER frame number (default 0)")
    p.add_argument("--cs-train", type=int, help="Cityscapes train annotated frames (default 24)")
    p.add_argument("--cs-val", type=int, help="Cityscapes val annotated frames (default 12)")
    p.add_argument("--cs-context", type=int,
                   help="Cityscapes train frames written before each annotated one (default 3)")
    p.add_argument("--cs-val-frames", type=int,
                   help="frames of each Cityscapes val snippet, from its first (default 30, as "
                        "the real ones: the 20th labelled)")
    p.add_argument("--synthia-frames", type=int, help="SYNTHIA-Seq frames (default 60)")
    a = p.parse_args(argv)
    if a.flying_chairs:
        if a.count < VAL_EVERY or min(a.chairs_size) < 16:
            p.error(f"--count must be >= {VAL_EVERY} and --chairs-size at least 16x16")
        n = write_flying_chairs(a.flying_chairs, a.count, a.chairs_size, a.seed, progress=True)
        print(f"wrote {n} Flying Chairs samples under {a.flying_chairs}")
        return
    if not a.out:
        p.error("--out DIR is required (or --flying-chairs DIR)")
    counts = {k: getattr(a, k) for k in DEFAULTS if getattr(a, k) is not None}
    sizes = {ds: getattr(a, f"{ds}_size") for ds in DATASETS if getattr(a, f"{ds}_size")}
    n = generate(a.out, seed=a.seed, datasets=a.datasets, native=a.native, tiny=a.tiny,
                 sizes=sizes, synthia_layout=a.synthia_layout, progress=True, flow=a.flow,
                 **counts)
    print(f"wrote {n} frames under {a.out}")
