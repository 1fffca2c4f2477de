"""``python -m sfc.predict``: segment a video with a trained model.

    python -m sfc.predict --checkpoint save_results/viper/SFC/stage_two/train/best.pt \
        --frames data/Cityscapes/leftImg8bit_sequence/val/frankfurt --out pred/frankfurt
    python -m sfc.predict --checkpoint best.pt --video drive.mp4 --out pred/drive \
        --keyframe-interval 5

An Accel checkpoint (this project's best.pt/last.pt, the release's stage-two best.pth) runs
streaming, as it was trained (`sfc.predict.stream`): with the keyframe interval N (default 5) a
keyframe's output is the reference branch alone; a frame d = 1 … N-1 frames later is the fusion
of the keyframe's reference logits, carried forward by the FlowNet's flow, with the frame's
update branch — exactly what `sfc.evaluate --keyframe-distance d` scores. A single-frame SegNet
checkpoint (a stage-one run) predicts each frame alone. Frames are resized (bicubic) to the
network size, the logits upsampled (bilinear) back to the frame's own size. Writes under --out:

  color/NAME.png     the prediction in the Cityscapes palette
  labelIds/NAME.png  Cityscapes labelIds (cityscapesscripts / the evaluation server read them)
  overlay/NAME.png   frame and colours blended
  prediction.mp4     frame | prediction, side by side
  predict.json       checkpoint, classes, size, the interval, each frame's keyframe distance,
                     frames/s measured
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from sfc import flags, vis
from sfc.data.classes import get_protocol, labelids_of_train_ids
from sfc.data.io import DatasetError, flow_normalise, resize_rgb, seg_normalise
from sfc.evaluate.checkpoint import (
    SOURCE_CLASSES,
    build_model,
    check_classes,
    inspect_checkpoint,
    resolve_run,
)
from sfc.predict.frames import FrameFolder, VideoFile
from sfc.predict.stream import StreamingAccel

DEFAULT_SIZE = (1024, 512)  # the release's Cityscapes input size (method §2.3)
DEFAULT_FPS = 17.0  # Cityscapes sequences are recorded at 17 Hz
DEFAULT_INTERVAL = 5  # keyframe period of the streaming Accel (Accel's own default is 5)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sfc.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--checkpoint", required=True,
                   help="an Accel run (its directory, best.pt or last.pt), the release's "
                        "stage-two best.pth, or a SegNet run (per-frame prediction)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--frames", metavar="DIR", help="a folder of frames (name order)")
    src.add_argument("--video", metavar="FILE", help="a video file (read with OpenCV)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--keyframe-interval", type=int, default=DEFAULT_INTERVAL, metavar="N",
                   help="Accel: the keyframe period — the reference branch runs on frames 0, "
                        "N, 2N, ... (their output), frames in between are flow-propagated and "
                        f"fused (default {DEFAULT_INTERVAL}; 1: every frame a keyframe, the "
                        "reference branch alone)")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="network input size (default: the checkpoint's training size, else "
                        "1024 512)")
    p.add_argument("--source", choices=sorted(SOURCE_CLASSES), default=None,
                   help="class protocol: viper (15) or synthia_seq (12) (default: the "
                        "checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if "
                                                  "available)")
    p.add_argument("--limit", type=int, default=None, help="predict only the first N frames")
    p.add_argument("--fps", type=float, default=None,
                   help="frame rate of the MP4 (default: the video's, else 17)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another job in --out (refused otherwise); the "
                        "same command again resumes instead")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; default: PyTorch's)")
    return p


def validate(args) -> None:
    flags.check_number(args, "threads", low=1)
    flags.check_number(args, "keyframe_interval", low=1)
    flags.check_number(args, "limit", low=1)
    flags.check_number(args, "fps", low=0, low_open=True)
    flags.check_size(args, "size")
    flags.check_device(args.device)
    flags.check_writable_dir(args.out, "--out", create=False)  # created once the input is ok


def _source_of(info) -> str:
    if info.config.get("source"):
        return info.config["source"]
    return {v: k for k, v in SOURCE_CLASSES.items()}.get(info.num_classes, "viper")


def _tensors(rgb: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, H, W) SegNet input and FlowNet input of an RGB frame (method §2.1)."""
    seg = torch.from_numpy(seg_normalise(rgb))[None].to(device)
    flow = torch.from_numpy(flow_normalise(rgb))[None].to(device)
    return seg, flow


OUTPUT_DIRS = ("color", "labelIds", "overlay")
MP4 = "prediction.mp4"


def _atomic_png(img: Image.Image, path: Path) -> None:
    """Save through a temporary file in the same folder and rename: a killed or failed write
    never leaves a truncated PNG under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _Writer:
    """The per-frame files (each written atomically) and the side-by-side MP4 (written under a
    temporary name; `close(keep=True)` finalises and renames it, `keep=False` removes it)."""

    def __init__(self, out: Path, palette, num_classes: int, frame_size, fps: float):
        self.out = out
        for d in OUTPUT_DIRS:
            (out / d).mkdir(parents=True, exist_ok=True)
        self.palette = palette
        self.label_ids = labelids_of_train_ids(num_classes)
        w, h = frame_size
        self.mp4 = out / MP4
        self.tmp_mp4 = out / f".{MP4}.tmp.mp4"
        self.video = cv2.VideoWriter(str(self.tmp_mp4), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                     (2 * w, h))
        if not self.video.isOpened():
            self.tmp_mp4.unlink(missing_ok=True)
            raise DatasetError(f"{self.mp4}: OpenCV cannot write an MP4 (mp4v) in {out} (is "
                               "the disk full or the folder read-only?)")

    def __call__(self, name: str, rgb: np.ndarray, pred: np.ndarray) -> None:
        colour = vis.colorize(pred, self.palette)  # (H0, W0, 3)
        _atomic_png(Image.fromarray(colour), self.out / "color" / f"{name}.png")
        _atomic_png(Image.fromarray(self.label_ids[pred]), self.out / "labelIds" / f"{name}.png")
        blend = (0.5 * rgb.astype(np.float32) + 0.5 * colour).round().astype(np.uint8)
        _atomic_png(Image.fromarray(blend), self.out / "overlay" / f"{name}.png")
        self.frame(rgb, colour)

    def frame(self, rgb: np.ndarray, colour: np.ndarray) -> None:
        """One MP4 frame: input | colour prediction."""
        self.video.write(cv2.cvtColor(np.concatenate([rgb, colour], axis=1), cv2.COLOR_RGB2BGR))

    def close(self, keep: bool = True) -> None:
        self.video.release()
        if keep and self.tmp_mp4.is_file():
            os.replace(self.tmp_mp4, self.mp4)
        else:
            self.tmp_mp4.unlink(missing_ok=True)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during prediction: `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _done(out: Path, name: str) -> bool:
    return all((out / d / f"{name}.png").is_file() for d in OUTPUT_DIRS)


def _check_out(out: Path, want: dict, overwrite: bool) -> dict | None:
    """The earlier `predict.json` in `out` if it holds this same job (resume); another job's
    results are refused unless --overwrite (then removed)."""
    pj = out / "predict.json"
    if not pj.is_file() and not any((out / d).is_dir() for d in OUTPUT_DIRS):
        return None
    try:
        old = json.loads(pj.read_text()) if pj.is_file() else {}
    except (OSError, ValueError):
        old = {}
    same = all(old.get(k) == v for k, v in want.items())
    if same and old:
        return old
    if not overwrite:
        have = old.get("input", "an unknown input (no readable predict.json)")
        raise flags.FlagError(f"--out {out} holds the predictions of another job ({have}, "
                              f"{old.get('checkpoint', '?')}); use another --out, or "
                              "--overwrite to replace them")
    for d in OUTPUT_DIRS:
        shutil.rmtree(out / d, ignore_errors=True)
    for f in (pj, out / MP4):
        f.unlink(missing_ok=True)
    return None


def _signals():
    """SIGTERM (what a scheduler sends) and SIGINT stop after the current frame."""
    state = {"signum": 0}

    def handler(signum, frame):
        if state["signum"]:  # a second signal: stop at once
            raise Interrupted(signum)
        state["signum"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return state, old


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def run(args) -> dict:
    validate(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = inspect_checkpoint(resolve_run(args.checkpoint))  # a file or a run directory
    source = args.source or _source_of(info)
    check_classes(info, source)
    protocol = get_protocol(SOURCE_CLASSES[source])
    size = tuple(args.size or info.config.get("target_size") or DEFAULT_SIZE)
    if info.mode != "accel" and args.keyframe_interval not in (1, DEFAULT_INTERVAL):
        raise flags.FlagError(f"--keyframe-interval applies to Accel checkpoints; "
                              f"{info.path} is a single-frame SegNet")
    frames = (FrameFolder(args.frames, args.limit) if args.frames
              else VideoFile(args.video, args.limit))
    out = Path(args.out)
    interval = args.keyframe_interval if info.mode == "accel" else None
    job = {"checkpoint": os.fspath(args.checkpoint), "input": os.fspath(args.frames or
                                                                        args.video),
           "size": list(size), "keyframe_interval": interval, "source": source}
    resumed = _check_out(out, job, args.overwrite)
    model = build_model(info).to(device).eval()
    stream = StreamingAccel(model, args.keyframe_interval) if info.mode == "accel" else None
    total = len(frames) or None
    writer = _Writer(out, protocol.palette, protocol.num_classes, frames.size,
                     args.fps or frames.fps or DEFAULT_FPS)
    keyframes, distances, names, skipped = [], [], [], 0
    restart = 0  # resuming: the first frame to compute (a keyframe for Accel)
    if resumed is not None:
        known = frames.names()
        first_missing = next((i for i, n in enumerate(known) if not _done(out, n)), len(known))
        restart = first_missing - first_missing % (interval or 1)
    model_s, t_all = 0.0, time.perf_counter()
    bar = tqdm(frames, total=total, desc="predict", dynamic_ncols=True, disable=args.no_progress)
    state, old_handlers = _signals()
    record = dict(job)
    complete = False
    try:
        with torch.no_grad():
            for i, (name, rgb) in enumerate(bar):
                if state["signum"]:
                    raise Interrupted(state["signum"])
                if i < restart:
                    # written by the interrupted run: its colour PNG goes into the MP4 as is
                    colour = np.asarray(Image.open(out / "color" / f"{name}.png").convert("RGB"))
                    writer.frame(rgb, colour)
                    if stream is not None:
                        stream.t += 1  # keep the keyframe phase
                        distances.append(i % interval)
                        if i % interval == 0:
                            keyframes.append(i)
                    names.append(name)
                    skipped += 1
                    continue
                seg, flow = _tensors(resize_rgb(rgb, size), device)
                t0 = time.perf_counter()
                if stream is not None:
                    logits = stream.step(seg, flow)  # (1, C, H, W)
                    distances.append(stream.distance)
                    if stream.distance == 0:
                        keyframes.append(i)
                else:
                    logits = model(seg)
                    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
                logits = F.interpolate(logits.float(), size=rgb.shape[:2], mode="bilinear",
                                       align_corners=False)  # the frame's own size
                pred = logits.argmax(1)[0].cpu().numpy()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                model_s += time.perf_counter() - t0
                writer(name, rgb, pred)
                names.append(name)
        complete = True
    except OSError as e:  # a full disk, a folder that went away: say where and how far
        writer.close(keep=False)
        bar.close()
        raise DatasetError(f"writing to {out} failed ({e.strerror or e}) after {len(names)} "
                           f"of {total or '?'} frames; free space or use another --out, then "
                           "run the same command again to resume") from None
    except (KeyboardInterrupt, Interrupted) as e:
        record["interrupted_by"] = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        bar.close()
    writer.close(keep=True)  # the frames done (all of them when complete) form a valid MP4
    n = len(names)
    total_s = time.perf_counter() - t_all
    computed = n - skipped
    record.update({
        "checkpoint_format": info.fmt, "mode": info.mode, "classes": protocol.class_names,
        "frame_size": list(frames.size), "complete": complete, "frames": n, "names": names,
        "frames_resumed": skipped, "keyframes": keyframes if stream is not None else None,
        "keyframe_distances": distances if stream is not None else None,
        "device": str(device),
        "frames_per_s_model": round(computed / model_s, 3) if model_s > 0 else None,
        "frames_per_s_total": round(computed / total_s, 3) if total_s > 0 and computed else None,
        "outputs": {"color": "color/", "labelIds": "labelIds/", "overlay": "overlay/",
                    "video": MP4},
    })
    _write_json(out / "predict.json", record)
    if not complete:
        print(f"sfc.predict: interrupted after {n} of {total or '?'} frames "
              f"({record['interrupted_by']}); {out / 'predict.json'} says which — run the same "
              "command again to resume", file=sys.stderr)
        return record
    how = (f"Accel, keyframe interval {args.keyframe_interval}: {len(keyframes)} keyframes "
           f"(reference branch), {n - len(keyframes)} flow-propagated" if stream is not None
           else "single-frame SegNet: every frame alone")
    more = f"; {skipped} resumed from an earlier run" if skipped else ""
    print(f"{n} frames → {out} ({record['frames_per_s_model']} frames/s for the model, "
          f"{record['frames_per_s_total']} with reading and writing; {how}{more})")
    return record


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        record = run(args)
    except flags.BAD_INPUT as e:
        return flags.report("sfc.predict", e)
    if not record.get("complete", True):  # 128 + signal: 130 Ctrl-C, 143 SIGTERM
        return 128 + signal.Signals[record["interrupted_by"]].value
    return 0
