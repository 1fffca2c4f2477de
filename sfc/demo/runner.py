"""`python -m sfc.demo`: the whole SFC pipeline on synthetic video domains, minutes on a CPU.

1. writes the synthetic source (VIPER or SYNTHIA-Seq layout) and target (Cityscapes-Seq layout)
   domains with `sfc.data.synthetic` into `<out>/data`, with their ground-truth flow, and a
   domain-neutral synthetic Flying Chairs set (skipped when already complete);
2. runs the Flying-Chairs stage (a FlowNetS supervised on ground-truth flow: the `--chairs-init`
   of both Accel stages, as the release's pretrained file is), then the seven stage scripts of
   `exp/` in the release's order, through bash, exactly as a user would, on a reduced
   configuration (`CONFIGS` below: small images, a small backbone, few iterations, no ImageNet
   init); then the BN control runs of the three SFC stages (`BN_CONTROL=1`: the same target
   forwards, no SFC loss), which separate the SFC loss from BatchNorm adaptation;
3. scores the source-only, BN-control and SFC Accels (and SegNets) with `python -m
   sfc.evaluate`: mIoU, accuracy against keyframe distance (K = 1, 2, 5) and temporal
   consistency judged by the ground-truth flow (`sfc.demo.evals`); measures SFC's premise with
   `python -m sfc.evaluate.premise` (flow EPE of the Chairs and the stage-two FlowNet on source
   and target against the zero-flow baseline, SegNet mIoU on source and target); predicts one
   val snippet with `python -m sfc.predict`;
4. prints a table (every stage's target-val mIoU or EPE, the premise, the ablation, the final
   model's per-class IoU) and writes it as JSON to `<out>/summary.json`;
5. draws a gallery of target-val frames and an animation of the predicted snippet
   (`sfc.demo.gallery`).

Interrupting (Ctrl-C) and re-running resumes: a finished stage (its `result.json` exists) is
skipped, an interrupted one resumes from its `last.pt` (the engine does that).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sfc.demo.evals import evaluate_all, predict_snippet
from sfc.demo.report import aggregate_seeds, build_summary, format_seeds, format_summary

REPO = Path(__file__).resolve().parents[2]
HINT = "Interrupted. Run the same command again to resume (finished stages are skipped)."


class DemoError(RuntimeError):
    """A failure the user can act on; printed without a traceback."""


# (run dir under <out>/runs/<source>, script under exp/, kind, what it is, extra environment)
CHAIRS_RUN = "FlowNet_chairs/train"
STAGES = [
    (CHAIRS_RUN, "FlowNet_chairs/script/train.sh", "flownet",
     "FlowNetS on (synthetic) Flying Chairs", {}),
    ("FlowNet_pretrain/stage_one/update", "FlowNet_pretrain/stage_one/script/update.sh",
     "segnet", "SegNet source-only (update branch)", {}),
    ("FlowNet_pretrain/stage_one/reference", "FlowNet_pretrain/stage_one/script/reference.sh",
     "segnet", "SegNet source-only (reference branch)", {}),
    ("FlowNet_pretrain/stage_two/train", "FlowNet_pretrain/stage_two/script/train.sh",
     "accel", "Accel source-only", {}),
    ("SFM/train", "SFM/script/train.sh", "sfm", "SFM (segmentation-to-flow) on the source", {}),
    ("SFC/stage_one/update", "SFC/stage_one/script/update.sh",
     "segnet", "SegNet + SFC (update branch)", {}),
    ("SFC/stage_one/reference", "SFC/stage_one/script/reference.sh",
     "segnet", "SegNet + SFC (reference branch)", {}),
    ("SFC/stage_two/train", "SFC/stage_two/script/train.sh", "accel", "Accel + SFC", {}),
    ("SFC_bn_control/stage_one/update", "SFC/stage_one/script/update.sh",
     "segnet", "SegNet + BN control (update branch)", {"BN_CONTROL": "1"}),
    ("SFC_bn_control/stage_one/reference", "SFC/stage_one/script/reference.sh",
     "segnet", "SegNet + BN control (reference branch)", {"BN_CONTROL": "1"}),
    ("SFC_bn_control/stage_two/train", "SFC/stage_two/script/train.sh",
     "accel", "Accel + BN control", {"BN_CONTROL": "1"}),
]

# The reduced configurations. Paper values (docs/method.md §5) for comparison: 1280×720 VIPER /
# 1280×640 SYNTHIA-Seq / 1024×512 Cityscapes, ResNet-101 (layers 3 4 23 3, width 64) from the
# ImageNet init, FlowNet from Flying Chairs, 80k/80k/80k/120k/160k iterations, eval every 2k.
# "chairs": the synthetic Flying Chairs (count, size) and its stage (iterations, evaluation
# period, Adam LR: 1e-3 instead of the recipe's 1e-4, chosen on the chairs val EPE of short runs
# — at 1e-4 a FlowNetS from scratch is still on its plateau after 1500 steps — and torch
# threads: batch-8 steps use two cores well, the other stages' tiny ones do not).
CONFIGS = {
    "demo": {
        "generator": {"seed": 0},
        "source_size": {"viper": (128, 72), "synthia_seq": (128, 64)},
        "target_size": (128, 64),
        "layers": (1, 1, 1, 1),
        "width": 16,
        "iters": {"segnet": 200, "accel": 100, "sfm": 100},
        "eval_every": {"segnet": 50, "accel": 50, "sfm": 50},
        "warmup_iters": 10,
        "val_limit": None,
        "synthia_val_frames": 10,
        "gallery_frames": 4,
        "chairs": {"count": 1000, "size": (128, 96), "iters": 1500, "eval_every": 500,
                   "lr": 1e-3, "threads": 2},
    },
    "smoke": {
        "generator": {"seed": 0},
        "source_size": {"viper": (64, 36), "synthia_seq": (64, 32)},
        "target_size": (64, 32),
        "layers": (1, 1, 1, 1),
        "width": 8,
        "iters": {"segnet": 4, "accel": 4, "sfm": 4},
        "eval_every": {"segnet": 2, "accel": 2, "sfm": 2},
        "warmup_iters": 1,
        "val_limit": 4,
        "synthia_val_frames": 4,
        "gallery_frames": 3,
        "chairs": {"count": 20, "size": (64, 48), "iters": 4, "eval_every": 2, "lr": 1e-3,
                   "threads": 1},
    },
}


def stage_args(kind: str, cfg: dict, source: str) -> list[str]:
    """The overrides the demo passes to one stage script (forwarded to `python -m sfc.train`)."""
    if kind == "flownet":
        c = cfg["chairs"]
        return ["--iters", str(c["iters"]), "--eval-every", str(c["eval_every"]),
                "--lr", str(c["lr"]), "--num-workers", "0"]
    w, h = cfg["source_size"][source]
    tw, th = cfg["target_size"]
    args = ["--iters", str(cfg["iters"][kind]), "--eval-every", str(cfg["eval_every"][kind]),
            "--source-size", str(w), str(h), "--target-size", str(tw), str(th),
            "--num-workers", "0"]
    if kind in ("segnet", "accel"):
        args += ["--layers", *map(str, cfg["layers"]), "--width", str(cfg["width"])]
    if kind == "segnet":
        args += ["--imagenet-init", "none"]
    if kind == "accel":  # --chairs-init: exp/common.sh takes the Flying-Chairs run
        args += ["--warmup-iters", str(cfg["warmup_iters"])]
    if kind == "sfm" and source == "synthia_seq":  # no source val split: hold out frames
        args += ["--synthia-val-frames", str(cfg["synthia_val_frames"])]
    if cfg["val_limit"] is not None:
        args += ["--val-limit", str(cfg["val_limit"])]
    return args


# --- steps ----------------------------------------------------------------------------------

def generate_data(data: Path, cfg: dict, source: str) -> None:
    """Write the synthetic domains once; a marker file records a complete, matching tree."""
    marker = data / ".sfc-demo-data.json"
    # layout 3: ground-truth flow and the synthetic Flying Chairs (layout 2: 30-frame val
    # snippets for keyframe distances and temporal consistency)
    want = json.loads(json.dumps({"generator": cfg["generator"], "datasets": [source, "cityscapes"],
                                  "layout": 3,
                                  "chairs": {k: cfg["chairs"][k] for k in ("count", "size")}}))
    if marker.is_file() and json.loads(marker.read_text()) == want:
        print(f"[data] synthetic domains already in {data} — skipped", flush=True)
        return
    if data.exists():  # partial or different: start over (the generator is deterministic)
        shutil.rmtree(data)
    print(f"[data] writing the synthetic domains to {data} ...", flush=True)
    t0 = time.time()
    from sfc.data.synthetic import generate
    from sfc.data.synthetic.chairs import write_flying_chairs

    generate(data, datasets=(source, "cityscapes"), progress=True, **cfg["generator"])
    write_flying_chairs(data / "FlyingChairs", cfg["chairs"]["count"], cfg["chairs"]["size"],
                        seed=cfg["generator"]["seed"], progress=True)
    marker.write_text(json.dumps(want))
    print(f"[data] done in {time.time() - t0:.1f} s", flush=True)


# The measurement commands run in the demo's own process, through the same `main` as
# `python -m ...` (the same code and output), without a second interpreter's start-up: about
# 2 s each, a third of a smoke evaluation. The training stages stay separate processes, run by
# their bash scripts as a user would.
IN_PROCESS = {"sfc.evaluate": "sfc.evaluate.cli", "sfc.evaluate.premise": "sfc.evaluate.premise",
              "sfc.predict": "sfc.predict.cli"}


def _run_in_process(cmd: list[str], env: dict) -> int:
    import importlib

    import torch

    main = importlib.import_module(IN_PROCESS[cmd[2]]).main
    threads = torch.get_num_threads()
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or threads))  # as a child would run
    try:
        return main(cmd[3:]) or 0
    except SystemExit as e:  # argparse
        return e.code if isinstance(e.code, int) else 1
    finally:
        torch.set_num_threads(threads)


def run_child(cmd: list[str], env: dict, what: str) -> None:
    """Run a command in the foreground: a child process (Ctrl-C reaches it too — same process
    group: wait for it to save its checkpoint and exit, then stop with the resume hint), or a
    measurement command of IN_PROCESS in this process."""
    if cmd[:2] == [sys.executable, "-m"] and cmd[2] in IN_PROCESS and env == dict(os.environ):
        rc = _run_in_process(cmd, env)
        if rc != 0:
            raise DemoError(f"{what} failed (exit code {rc}); command: {' '.join(cmd)}. "
                            "Fix the cause and run the demo again: it resumes where it "
                            "stopped.")
        return
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=120)
        except KeyboardInterrupt:
            proc.kill()
        raise
    if rc != 0:
        raise DemoError(f"{what} failed (exit code {rc}); command: {' '.join(cmd)}. "
                        "Fix the cause and run the demo again: it resumes where it stopped.")


def run_stages(out: Path, cfg: dict, source: str, timings: dict, data: Path | None = None,
               repeat: int = 0) -> None:
    """The eleven runs through their scripts. `repeat` r > 0 (`--seeds`): every seed shifted by 2r
    (update/reference keep distinct seeds), on the same `data`."""
    # the stage scripts run this interpreter (a venv's python without PYTHON set works)
    env = dict(os.environ, SFC_DATA=str(data or out / "data"), SFC_OUT=str(out / "runs"),
               SFC_WEIGHTS=str(out / "weights"), SOURCE=source, PYTHON=sys.executable)
    (out / "weights").mkdir(parents=True, exist_ok=True)  # empty: no pretrained weights
    for i, (run, script, kind, title, extra_env) in enumerate(STAGES, 1):
        header = f"[{i}/{len(STAGES)}] {run.rsplit('/', 1)[0] if run.endswith('/train') else run}"
        print(f"\n{header} — {title}", flush=True)
        run_dir = out / "runs" / source / run
        if (run_dir / "result.json").is_file():
            print(f"    finished earlier ({run_dir / 'result.json'}) — skipped", flush=True)
            continue
        cmd = ["bash", str(Path("exp") / script), *stage_args(kind, cfg, source)]
        if repeat:
            cmd += ["--seed", str((1 if script.endswith("reference.sh") else 0) + 2 * repeat)]
        if kind == "flownet":
            n = str(cfg["chairs"]["threads"])
            extra_env = {**extra_env, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        print("    $ " + "".join(f"{k}={v} " for k, v in extra_env.items()) + " ".join(cmd),
              flush=True)
        t0 = time.time()
        run_child(cmd, {**env, **extra_env}, f"stage {run}")
        if not (run_dir / "result.json").is_file():
            raise DemoError(f"stage {run} exited 0 but wrote no {run_dir / 'result.json'}")
        timings[run] = round(time.time() - t0, 1)
        _save_json(out / "timings.json", timings)


def _save_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def check_config(out: Path, mode: str, cfg: dict, source: str) -> None:
    """A run tree made with another configuration cannot be resumed into: say so."""
    path = out / "demo_config.json"
    want = json.loads(json.dumps({"mode": mode, "source": source, **cfg}))
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            raise DemoError(f"{out} holds a demo run with another configuration "
                            f"(mode {have.get('mode')}, source {have.get('source')}); "
                            "use another --out or delete that folder")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _save_json(path, want)


def repeat_seeds(out: Path, cfg: dict, source: str, mode: str, first: dict, n: int) -> dict:
    """Repeats 1..n-1 of the runs and evaluations in <out>/seed<r>/ (same data); the mean ±
    std over the n summaries."""
    summaries = [first]
    for r in range(1, n):
        sub = out / f"seed{r}"
        timings = {}
        print(f"\n[seeds] repeat {r + 1}/{n} in {sub}", flush=True)
        run_stages(sub, cfg, source, timings, data=out / "data", repeat=r)
        evals = evaluate_all(sub, cfg, source, timings, run_child, data=out / "data")
        summaries.append(build_summary(sub, source, mode, cfg, STAGES, evals, timings))
        _save_json(sub / "summary.json", summaries[-1])
    return aggregate_seeds(summaries)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sfc.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("viper", "synthia_seq"),
                   default=os.environ.get("SOURCE") or "viper",
                   help="source domain (default: $SOURCE, else viper)")
    p.add_argument("--smoke", action="store_true",
                   help="the CI setting: tiny sizes and a few iterations per stage")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default save_results/demo, or "
                        "save_results/demo_synthia_seq for --source synthia_seq)")
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat the eleven runs with N seeds (seeds shifted by 2 per repeat, in "
                        "<out>/seed<r>/) and report mean ± std of the ablation (opt-in)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of the demo and its children (default 1: with the "
                        "demo's tiny convolutions, more threads were slower on a 2-core CPU)")
    args = p.parse_args(argv)
    if args.source not in ("viper", "synthia_seq"):
        p.error(f"SOURCE must be viper or synthia_seq, got {args.source!r}")
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: expected >= 1")
    mode = "smoke" if args.smoke else "demo"
    cfg = CONFIGS[mode]
    out = args.out or REPO / "save_results" / ("demo" if args.source == "viper"
                                              else f"demo_{args.source}")
    out = out.resolve()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))

    if not (REPO / "exp" / STAGES[0][1]).is_file():
        print(f"sfc.demo: error: the stage scripts are not in {REPO / 'exp'}; run the demo from "
              "a checkout of the repository with sfc installed editable (make demo)",
              file=sys.stderr)
        return 1
    t_start = time.time()
    timings_path = out / "timings.json"
    try:
        check_config(out, mode, cfg, args.source)
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        print(f"SFC demo ({mode}, source {args.source}) → {out}", flush=True)
        generate_data(out / "data", cfg, args.source)
        run_stages(out, cfg, args.source, timings)
        evals = evaluate_all(out, cfg, args.source, timings, run_child)
        predicted = predict_snippet(out, cfg, args.source, timings, run_child)
        _save_json(out / "timings.json", timings)
        summary = build_summary(out, args.source, mode, cfg, STAGES, evals, timings)
        from sfc.demo.gallery import make_gallery

        print("\n[gallery] drawing target-val frames ...", flush=True)
        summary["gallery"] = make_gallery(out, args.source, cfg["target_size"],
                                          cfg["gallery_frames"], threads=args.threads,
                                          predicted=predicted)
        if args.seeds > 1:
            summary["seeds"] = repeat_seeds(out, cfg, args.source, mode, summary, args.seeds)
        summary["wall_s_this_invocation"] = round(time.time() - t_start, 1)
        _save_json(out / "summary.json", summary)
        print("\n" + format_summary(summary), flush=True)
        if "seeds" in summary:
            print("\n" + "\n".join(format_seeds(summary["seeds"])), flush=True)
        print(f"\nsummary: {out / 'summary.json'}\ngallery: {out / summary['gallery']['index']}")
        print(f"demo finished in {time.time() - t_start:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("\n" + HINT, file=sys.stderr, flush=True)
        return 130
    except DemoError as e:
        print(f"\nsfc.demo: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
