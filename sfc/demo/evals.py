"""The demo's measurements, each through the command a user would run (its `main`, called in
the demo's process: the same code and output without a second start-up): `python -m
sfc.evaluate` on the three Accels (source-only, BN control, SFC; best and last iterate) with
the keyframe distances 1, 2, 5 and temporal consistency (per keyframe distance, and as deployed:
the streaming Accel with a keyframe every 5 frames), on the three update-branch SegNets
(TC beside their mIoU), and `python -m sfc.predict` of the source-only and the SFC Accel on one
synthetic target-val snippet (for the gallery's animation). Every model's TC is judged by the
same, independent flow: the synthetic target's ground truth (`--tc-flow gt`). SFC's premise is
measured with `python -m sfc.evaluate.premise`: the Flying-Chairs FlowNet and the
FlowNet_pretrain stage-two FlowNet (`flownet_global`) on the source's and the target's
ground-truth flow (and, with scikit-image, on Middlebury's real stereo pair), the three
update-branch SegNets on source val and target val."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SO_ACCEL, CTL_ACCEL, SFC_ACCEL = ("FlowNet_pretrain/stage_two/train",
                                  "SFC_bn_control/stage_two/train", "SFC/stage_two/train")
ACCELS = {"source_only": SO_ACCEL, "bn_control": CTL_ACCEL, "sfc": SFC_ACCEL}
SEGNETS = {"source_only": "FlowNet_pretrain/stage_one/update",
           "bn_control": "SFC_bn_control/stage_one/update", "sfc": "SFC/stage_one/update"}
KEYFRAMES = (1, 2, 5)
TC_KEYFRAME_INTERVAL = 5  # TC as deployed: sfc.predict's default keyframe interval
CHAIRS_RUN = "FlowNet_chairs/train"
FLOWNETS = {"chairs": CHAIRS_RUN, "stage_two": SO_ACCEL}  # the premise's FlowNets
PREDICT_FRAMES = 30  # one synthetic val snippet (the real ones hold 30 frames)


def eval_name(run: str, which: str) -> str:
    return f"{run.replace('/', '__')}__{which}.json"


def _evaluate(out: Path, cfg: dict, source: str, ckpt: Path, dest: Path, extra: list[str],
              run_child, timings: dict, what: str, data: Path) -> dict:
    if not dest.is_file():
        print(f"\n[eval] {what} on the target val set", flush=True)
        cmd = [sys.executable, "-m", "sfc.evaluate", "--checkpoint", str(ckpt),
               "--data", str(data), "--source", source, "--json", str(dest),
               "--size", *map(str, cfg["target_size"]), "--workers", "0", *extra]
        if cfg["val_limit"] is not None:
            cmd += ["--limit", str(cfg["val_limit"])]
        dest.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        run_child(cmd, dict(os.environ), f"evaluation of {ckpt}")
        timings[f"eval {what}"] = round(time.time() - t0, 1)
    return json.loads(dest.read_text())


def evaluate_all(out: Path, cfg: dict, source: str, timings: dict, run_child,
                 data: Path | None = None) -> dict:
    """`{"RUN:best"|"RUN:last": evaluation record}` for the Accels and `"RUN:best"` for the
    SegNets."""
    runs = out / "runs" / source
    data = data or out / "data"
    tc = ["--temporal-consistency", "--tc-flow", "gt"]
    results = {}
    for run in ACCELS.values():
        for which in ("best", "last"):
            results[f"{run}:{which}"] = _evaluate(
                out, cfg, source, runs / run / f"{which}.pt", out / "eval" / eval_name(run, which),
                ["--keyframe-distance", *map(str, KEYFRAMES), *tc, "--tc-keyframe-interval",
                 str(TC_KEYFRAME_INTERVAL)], run_child, timings,
                f"{run} ({which}.pt)", data)
    for run in SEGNETS.values():
        results[f"{run}:best"] = _evaluate(
            out, cfg, source, runs / run / "best.pt", out / "eval" / eval_name(run, "best"),
            ["--mode", "segnet", *tc], run_child, timings, f"{run} (best.pt)", data)
    results["premise"] = premise(out, cfg, source, timings, run_child, data)
    return results


def _has_skimage() -> bool:
    import importlib.util

    return importlib.util.find_spec("skimage") is not None


def premise(out: Path, cfg: dict, source: str, timings: dict, run_child, data: Path) -> dict:
    """`python -m sfc.evaluate.premise` on the demo's runs (best.pt of each)."""
    dest = out / "eval" / "premise.json"
    if not dest.is_file():
        runs = out / "runs" / source
        print("\n[premise] flow EPE on source and target, SegNet mIoU on source and target",
              flush=True)
        cmd = [sys.executable, "-m", "sfc.evaluate.premise", "--data", str(data),
               "--source", source, "--json", str(dest), "--device", "cpu", "--no-progress",
               "--source-size", *map(str, cfg["source_size"][source]),
               "--target-size", *map(str, cfg["target_size"]),
               "--synthia-val-frames", str(cfg["synthia_val_frames"])]
        for run in FLOWNETS.values():
            cmd += ["--flownet", str(runs / run / "best.pt")]
        for run in SEGNETS.values():
            cmd += ["--segnet", str(runs / run / "best.pt")]
        if _has_skimage():  # real photographs (scikit-image's Middlebury pair), 1/5 size
            cmd += ["--real-pair", "--real-size", "148", "100"]
        if cfg["val_limit"] is not None:
            cmd += ["--limit", str(cfg["val_limit"])]
        dest.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        run_child(cmd, dict(os.environ), "the premise measurement")
        timings["eval premise"] = round(time.time() - t0, 1)
    return json.loads(dest.read_text())


def predict_snippet(out: Path, cfg: dict, source: str, timings: dict, run_child) -> dict:
    """`python -m sfc.predict` of the source-only and the SFC Accel (best.pt) on the first
    synthetic val snippet; returns {name: output folder} and the frames folder."""
    val = out / "data" / "Cityscapes" / "leftImg8bit_sequence" / "val"
    frames = sorted(p for p in val.iterdir() if p.is_dir())[0]
    dirs = {}
    for name in ("source_only", "sfc"):
        dest = out / "predict" / name
        if not (dest / "predict.json").is_file():
            print(f"\n[predict] {ACCELS[name]} (best.pt) on {frames.name}, "
                  f"{PREDICT_FRAMES} frames", flush=True)
            cmd = [sys.executable, "-m", "sfc.predict", "--checkpoint",
                   str(out / "runs" / source / ACCELS[name] / "best.pt"), "--frames", str(frames),
                   "--out", str(dest), "--size", *map(str, cfg["target_size"]),
                   "--limit", str(PREDICT_FRAMES), "--device", "cpu", "--no-progress",
                   "--source", source]
            t0 = time.time()
            run_child(cmd, dict(os.environ), f"prediction with {ACCELS[name]}")
            timings[f"predict {name}"] = round(time.time() - t0, 1)
        dirs[name] = dest
    return {"frames": frames, "outputs": dirs}
