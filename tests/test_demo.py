"""`python -m sfc.demo`: the summary logic (fast) and the smoke demo end to end (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfc import demo
from sfc.demo.report import build_summary, format_summary

REPO = Path(__file__).resolve().parent.parent
RUNS = [run for run, *_ in demo.STAGES]


# --- fast: configuration, summary arithmetic, table --------------------------------------

def test_stage_order_and_scripts_exist():
    assert RUNS == ["FlowNet_chairs/train",
                    "FlowNet_pretrain/stage_one/update", "FlowNet_pretrain/stage_one/reference",
                    "FlowNet_pretrain/stage_two/train", "SFM/train", "SFC/stage_one/update",
                    "SFC/stage_one/reference", "SFC/stage_two/train",
                    "SFC_bn_control/stage_one/update", "SFC_bn_control/stage_one/reference",
                    "SFC_bn_control/stage_two/train"]
    for run, script, _, _, env in demo.STAGES:
        assert env == ({"BN_CONTROL": "1"} if run.startswith("SFC_bn_control") else {})
        path = REPO / "exp" / script
        assert path.is_file(), path
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


@pytest.mark.parametrize("mode", ["demo", "smoke"])
def test_stage_args_no_pretrained_weights_and_reduced(mode):
    cfg = demo.CONFIGS[mode]
    seg = demo.stage_args("segnet", cfg, "viper")
    acc = demo.stage_args("accel", cfg, "synthia_seq")
    sfm = demo.stage_args("sfm", cfg, "synthia_seq")
    assert seg[seg.index("--imagenet-init") + 1] == "none"
    assert "--chairs-init" not in acc  # exp/common.sh takes the demo's Flying-Chairs run
    chairs = demo.stage_args("flownet", cfg, "viper")
    assert chairs[chairs.index("--iters") + 1] == str(cfg["chairs"]["iters"])
    assert "--source-size" not in chairs and "--layers" not in chairs
    assert "--imagenet-init" not in acc and "--layers" not in sfm
    assert seg[seg.index("--layers") + 1: seg.index("--layers") + 5] == list(
        map(str, cfg["layers"]))
    w, h = cfg["source_size"]["synthia_seq"]
    assert acc[acc.index("--source-size") + 1: acc.index("--source-size") + 3] == [str(w), str(h)]
    assert sfm[sfm.index("--synthia-val-frames") + 1] == str(cfg["synthia_val_frames"])
    assert "--synthia-val-frames" not in demo.stage_args("sfm", cfg, "viper")
    assert int(seg[seg.index("--iters") + 1]) <= 1000  # reduced (paper: 80k-160k)


def _fake_tree(tmp_path, values):
    """Run dirs with result.json: values[run] = (best, last)."""
    for run, (best, last) in values.items():
        d = tmp_path / "runs" / "viper" / run
        d.mkdir(parents=True)
        monitor = "epe" if run in ("SFM/train", "FlowNet_chairs/train") else "miou"
        (d / "result.json").write_text(json.dumps({
            "stage": "x", "monitor": monitor, "best": {"iter": 10, "value": best},
            "last": {"iter": 20, "value": last}, "per_class_last": None}))


def demo_names(n):
    from sfc.data.classes import get_protocol

    return get_protocol(n).class_names


def _record(miou, n=15, tc=None, by_k=None, deployed=None):
    rec = {"miou": miou, "per_class": {c: miou for c in demo_names(n)},
           "per_class_not_in_mean": {}}
    if deployed is not None:
        rec["tc_streaming"] = [{"keyframe_interval": 3, "tc": 0.0},
                               {"keyframe_interval": 5, "tc": deployed}]
    if by_k:
        rec["keyframe_distances"] = [{"keyframe_distance": k, "miou": v} for k, v in by_k.items()]
    if tc is not None:
        rec["temporal_consistency"] = {"tc": tc}
    return rec


def test_build_summary_compares_source_only_with_sfc(tmp_path):
    values = {r: (0.20, 0.18) for r in RUNS}
    values["SFC/stage_one/update"] = (0.30, 0.26)
    values["SFC/stage_one/reference"] = (0.20, 0.20)  # SFC SegNet mean: 0.25 / 0.23
    values["SFM/train"] = (0.5, 0.6)
    values["SFC_bn_control/stage_one/update"] = (0.24, 0.21)
    _fake_tree(tmp_path, values)
    k = {1: 0.21, 2: 0.19, 5: 0.15}
    evals = {"FlowNet_pretrain/stage_two/train:best": _record(0.25, tc=0.9, by_k=k),
             "FlowNet_pretrain/stage_two/train:last": _record(0.22, tc=0.9, by_k=k),
             "SFC/stage_two/train:best": _record(0.21, tc=0.8, by_k=k),
             "SFC/stage_two/train:last": _record(0.22, tc=0.8, by_k=k),
             "SFC_bn_control/stage_two/train:best": _record(0.20, tc=0.85, by_k=k,
                                                             deployed=0.83),
             "SFC_bn_control/stage_two/train:last": _record(0.19, tc=0.85, by_k=k),
             "FlowNet_pretrain/stage_one/update:best": _record(0.3, tc=0.7),
             "SFC/stage_one/update:best": _record(0.3, tc=0.75),
             "SFC_bn_control/stage_one/update:best": _record(0.3, tc=0.72)}
    s = build_summary(tmp_path, "viper", "demo", demo.CONFIGS["demo"], demo.STAGES, evals, {})
    assert [r["stage"] for r in s["stages"]] == RUNS
    c = s["comparison"]
    assert c["best"]["segnet_source_only_mean"] == pytest.approx(0.20)
    assert c["best"]["segnet_sfc_mean"] == pytest.approx(0.25)
    assert c["last"]["segnet_delta"] == pytest.approx(0.05)
    assert c["best"]["accel_delta"] == pytest.approx(-0.04)
    assert c["last"]["accel_delta"] == pytest.approx(0.0)
    assert "-4.0 points, below source-only" in s["verdict"]
    assert "about the same as source-only" in s["verdict"]
    assert c["best"]["accel_sfc_minus_control"] == pytest.approx(0.01)
    assert c["last"]["accel_sfc_minus_control"] == pytest.approx(0.03)
    assert "best: 21.0 vs 20.0 mIoU (+1.0 points, above the BN control)" in s["verdict"]
    rows = {(r["model"], r["variant"]): r for r in s["ablation"]["rows"]}
    assert rows["SegNet (update branch)", "bn_control"]["miou_best"] == 0.24
    assert rows["SegNet (update branch)", "sfc"]["tc_best"] == 0.75
    assert rows["Accel", "bn_control"]["miou_last"] == 0.19
    assert rows["Accel", "sfc"]["miou_by_keyframe"]["best"] == {"1": 0.21, "2": 0.19, "5": 0.15}
    assert s["final_model"]["miou"] == 0.21 and len(s["final_model"]["per_class"]) == 15
    table = format_summary(s)
    assert "[5] SFM/train" in table and "0.500 px @10" in table and "0.600 px @20" in table
    assert "30.0 @10" in table  # SFC stage one update, best, in percent
    last_line = [ln for ln in table.splitlines() if ln.startswith("mIoU")][0]
    assert last_line.split()[1:] == ["25.0", "21.0", "22.0", "22.0"]
    assert "Ablation: what the SFC loss adds beyond BatchNorm adaptation" in table
    ctl_row = [ln for ln in table.splitlines() if ln.startswith("Accel") and "BN control" in ln]
    assert ctl_row[0].split()[-5:] == ["20.0", "19.0", "85.0", "85.0", "83.0"]
    assert rows["Accel", "bn_control"]["tc_deployed"] == 0.83  # the interval-5 record
    assert rows["Accel", "sfc"]["tc_deployed"] is None  # an older record: none
    k_row = [ln for ln in table.splitlines() if ln.startswith("SFC ") and len(ln.split()) == 4]
    assert k_row[0].split() == ["SFC", "21.0", "19.0", "15.0"]


def test_other_configuration_in_the_same_folder_is_refused(tmp_path):
    demo.check_config(tmp_path, "smoke", demo.CONFIGS["smoke"], "viper")
    demo.check_config(tmp_path, "smoke", demo.CONFIGS["smoke"], "viper")  # same: fine
    with pytest.raises(demo.DemoError, match="another configuration"):
        demo.check_config(tmp_path, "demo", demo.CONFIGS["demo"], "viper")


# --- slow: the smoke demo end to end ------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_smoke")
    env = {k: v for k, v in os.environ.items() if k != "SOURCE"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "sfc.demo", "--smoke", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return out, r, time.time() - t0


def _finite(x):
    return isinstance(x, float) and math.isfinite(x)


@pytest.mark.slow
def test_smoke_demo_trains_every_stage_and_reports(smoke):
    out, r, _ = smoke
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for run in RUNS:
        d = out / "runs" / "viper" / run
        for f in ("best.pt", "last.pt", "result.json"):
            assert (d / f).is_file(), d / f
    s = json.loads((out / "summary.json").read_text())
    assert [row["stage"] for row in s["stages"]] == RUNS
    epe_runs = ("SFM/train", "FlowNet_chairs/train")
    for row in s["stages"]:
        assert row["monitor"] == ("epe" if row["stage"] in epe_runs else "miou")
        for which in ("best", "last"):
            v = row[which]["value"]
            assert _finite(v) and v >= 0 and (row["monitor"] == "epe" or v <= 1), row
    final = s["final_model"]
    assert list(final["per_class"]) == demo_names(15)
    assert all(_finite(v) and 0 <= v <= 1 for v in final["per_class"].values())
    assert final["miou"] == pytest.approx(np.mean(list(final["per_class"].values())))
    # the printed table: every stage, every class, the verdict
    assert "SFC demo summary" in r.stdout
    for i, run in enumerate(RUNS, 1):
        assert f"[{i}] {run}" in r.stdout
    for name in demo_names(15):
        assert name in r.stdout
    assert "as measured" in r.stdout
    # the progress display: stage headers
    assert "[4/11] FlowNet_pretrain/stage_two — Accel source-only" in r.stdout
    # the flow measurements: the premise (both FlowNets on source and target ground truth,
    # with the zero baseline) and the SFM against its zero baseline
    prem = s["flow"]["premise"]
    assert [f["label"].split(" ")[0] for f in prem["flownets"]] == [
        "FlowNet_chairs/train", "FlowNet_pretrain/stage_two/train"]
    for f in prem["flownets"]:
        for dom in ("source", "target"):
            assert _finite(f[dom]["epe"]) and f[dom]["epe_zero"] > 0
        assert _finite(f["epe_ratio_target_source"])
    assert len(prem["segnets"]) == 3 and all(_finite(x["miou_drop"]) for x in prem["segnets"])
    assert s["flow"]["sfm"]["best"]["epe_zero"] > 0
    assert "SFC's premise" in r.stdout and "a zero SF would score" in r.stdout
    assert "the last 5 pairs up to each val snippet's labelled frame" in s["ablation"][
        "tc_definition"]
    assert "TC deployed: the streaming Accel with a keyframe every 5 frames" in s["ablation"][
        "tc_definition"]
    assert "ground-truth flow" in s["ablation"]["tc_definition"]
    # the gallery
    g = out / "gallery"
    frames = sorted(g.glob("frame_*.png"))
    assert len(frames) == demo.CONFIGS["smoke"]["gallery_frames"]
    combined = np.asarray(Image.open(g / "gallery.png"))
    one = np.asarray(Image.open(frames[0]))
    assert one.shape[1] == combined.shape[1] == 7 * 256 + 6 * 4  # seven panels in a row
    assert combined.shape[0] > len(frames) * 100
    assert "gallery.png" in (g / "index.html").read_text()
    # the ablation (BN control) and the video measurements
    abl = {(r["model"], r["variant"]): r for r in s["ablation"]["rows"]}
    assert len(abl) == 6
    for row in abl.values():
        assert _finite(row["miou_best"]) and 0 <= row["tc_best"] <= 1, row
    for v in ("source_only", "bn_control", "sfc"):
        assert sorted(abl["Accel", v]["miou_by_keyframe"]["best"]) == ["1", "2", "5"]
        assert 0 < abl["Accel", v]["tc_deployed"] <= 1
    assert "Ablation: what the SFC loss adds" in r.stdout and "K=5" in r.stdout
    assert "against the BN-control Accel" in s["verdict"]
    gif = Image.open(g / "predict.gif")
    assert gif.n_frames == 30 and "predict.gif" in (g / "index.html").read_text()
    pj = json.loads((out / "predict" / "sfc" / "predict.json").read_text())
    assert pj["frames"] == 30 and pj["mode"] == "accel"


@pytest.mark.slow
def test_smoke_demo_chains_the_scripts(smoke):
    """What the smoke demo's eleven script runs left behind: each stage consumed the earlier
    ones' outputs as a user's chain would, and `sfc.evaluate` on the final model gives the
    in-training validation's number (the demo evaluates the same val frames)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, r, _ = smoke
    assert r.returncode == 0
    runs = out / "runs" / "viper"
    iters = demo.CONFIGS["smoke"]["iters"]
    for run, _, kind, _, _ in demo.STAGES:
        for f in ("config.json", "log.txt", "metrics.jsonl", "last.pt", "best.pt"):
            assert (runs / run / f).is_file(), f"{run}/{f}"
        res = json.loads((runs / run / "result.json").read_text())
        want = demo.CONFIGS["smoke"]["chairs"]["iters"] if kind == "flownet" else iters.get(kind)
        assert res["last"]["iter"] == want and res["checkpoint_best"] == "best.pt"
        assert res["monitor"] == ("epe" if kind in ("sfm", "flownet") else "miou")
        if kind == "flownet":
            assert res["best"]["epe_zero"] > 0 and "fl_all" in res["best"]
            assert (runs / run / "flownet_flyingchairs_pretrained.pth").is_file()
        elif kind == "sfm":
            assert res["best"]["value"] > 0 and res["per_class_last"] is None
        else:
            assert 0.0 <= res["best"]["value"] <= 1.0 and len(res["per_class_last"]) == 15
    log = (runs / "SFC/stage_two/train/log.txt").read_text()
    assert str(runs / "SFC/stage_one/update/best.pt") in log
    assert f"accel.flownet <- Flying Chairs {runs / 'FlowNet_chairs/train/best.pt'}" in log
    assert str(runs / "SFM/train/best.pt") in log
    final = torch.load(runs / "SFC/stage_two/train/best.pt", weights_only=True)
    assert set(final["models"]) == {"accel", "flownet_global", "sfm"}
    train_logs = [json.loads(x) for x in
                  (runs / "SFC/stage_one/update/metrics.jsonl").read_text().splitlines()]
    assert any("sfc" in x for x in train_logs if x["split"] == "train")
    # TensorBoard pictures at each evaluation (prediction|label, and SF next to the flow)
    for run, tags in (("SFC/stage_one/update", {"pred|label", "flow/SF|OF"}),
                      ("SFC/stage_two/train", {"pred|label", "flow/SF|OF"}),
                      ("SFM/train", {"flow/SF_gt|OF"}),
                      ("FlowNet_chairs/train", {"flow/pred|gt"})):
        ea = EventAccumulator(str(runs / run / "tb"))
        ea.Reload()
        assert set(ea.Tags()["images"]) == tags, run
        assert "val_iou/road" in ea.Tags()["scalars"] or run in ("SFM/train",
                                                                  "FlowNet_chairs/train")
    ev = json.loads((out / "eval" / "SFC__stage_two__train__best.json").read_text())
    res = json.loads((runs / "SFC/stage_two/train/result.json").read_text())
    assert abs(ev["miou"] - res["best"]["value"]) < 1e-9


@pytest.mark.slow
def test_smoke_demo_rerun_skips_finished_stages(smoke):
    out, first, _ = smoke
    assert first.returncode == 0
    before = {run: (out / "runs" / "viper" / run / "last.pt").stat().st_mtime_ns for run in RUNS}
    env = {k: v for k, v in os.environ.items() if k != "SOURCE"}
    r = subprocess.run([sys.executable, "-m", "sfc.demo", "--smoke", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished earlier") == len(RUNS)
    assert "already in" in r.stdout  # data not regenerated
    after = {run: (out / "runs" / "viper" / run / "last.pt").stat().st_mtime_ns for run in RUNS}
    assert after == before  # nothing retrained
    assert "SFC demo summary" in r.stdout


def test_seeds_aggregate_mean_and_std():
    from sfc.demo.report import aggregate_seeds, format_seeds

    def summary(sfc_best, tc):
        rows = [{"model": "Accel", "variant": v, "miou_best": b, "miou_last": b, "tc_best": tc,
                 "tc_last": None, "miou_by_keyframe": {"best": {"1": b, "5": b / 2}}}
                for v, b in (("source_only", 0.2), ("sfc", sfc_best))]
        return {"ablation": {"rows": rows}}

    agg = aggregate_seeds([summary(0.30, 0.8), summary(0.34, 0.9), summary(0.26, 1.0)])
    sfc = agg["rows"][1]
    assert agg["n"] == 3 and sfc["variant"] == "sfc"
    assert sfc["miou_best"]["mean"] == pytest.approx(0.30)
    assert sfc["miou_best"]["std"] == pytest.approx(0.04)  # sample std of 0.30, 0.34, 0.26
    assert sfc["tc_best"]["mean"] == pytest.approx(0.9) and sfc["tc_last"] is None
    assert sfc["miou_by_keyframe_best"]["5"]["mean"] == pytest.approx(0.15)
    assert agg["rows"][0]["miou_best"]["std"] == pytest.approx(0.0, abs=1e-12)
    table = "\n".join(format_seeds(agg))
    assert "over 3 seeds" in table and "30.0 ± 4.0" in table


def test_seeds_paired_difference_and_the_verdict_rule():
    from sfc.demo.report import aggregate_seeds, format_seeds

    def summary(sfc, ctl):
        rows = [{"model": m, "variant": v, "miou_best": b, "miou_last": b, "tc_best": 0.5,
                 "tc_last": None}
                for m in ("SegNet (update branch)", "Accel")
                for v, b in (("source_only", 0.1), ("bn_control", ctl), ("sfc", sfc))]
        return {"ablation": {"rows": rows}}

    # +2, +3, +4 points: positive in every seed, mean 3 > 2 × std 1 → called positive
    agg = aggregate_seeds([summary(0.22, 0.20), summary(0.23, 0.20), summary(0.24, 0.20)])
    acc = [r for r in agg["paired"] if r["model"] == "Accel"][0]["miou_best"]
    assert acc["per_seed"] == pytest.approx([0.02, 0.03, 0.04])
    assert acc["mean"] == pytest.approx(0.03) and acc["std"] == pytest.approx(0.01)
    assert acc["positive"] is True
    assert "adds accuracy beyond BatchNorm adaptation" in "\n".join(format_seeds(agg))
    # +5, -1, +5: one seed negative → not separable
    agg = aggregate_seeds([summary(0.25, 0.20), summary(0.19, 0.20), summary(0.25, 0.20)])
    acc = [r for r in agg["paired"] if r["model"] == "Accel"][0]["miou_best"]
    assert acc["positive"] is False
    assert "not separable from BatchNorm adaptation" in "\n".join(format_seeds(agg))
    # +1, +5, +9: positive in every seed but mean 5 < 2 × std 4 → not separable
    agg = aggregate_seeds([summary(0.21, 0.20), summary(0.25, 0.20), summary(0.29, 0.20)])
    assert [r for r in agg["paired"] if r["model"] == "Accel"][0]["miou_best"]["positive"] \
        is False


def test_repeated_seeds_shift_every_seed_by_two(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(demo.runner, "run_child", lambda cmd, env, what: seen.append(cmd))
    with pytest.raises(demo.DemoError, match="wrote no"):  # the fake child writes nothing
        demo.runner.run_stages(tmp_path, demo.CONFIGS["smoke"], "viper", {}, repeat=2)
    assert seen[0][1].endswith("FlowNet_chairs/script/train.sh")
    assert seen[0][-2:] == ["--seed", "4"]  # 0 + 2·2
    for run in ("FlowNet_chairs/train", "FlowNet_pretrain/stage_one/update"):
        seen.clear()
        (tmp_path / "runs/viper" / run).mkdir(parents=True)
        (tmp_path / "runs/viper" / run / "result.json").write_text("{}")
        with pytest.raises(demo.DemoError):
            demo.runner.run_stages(tmp_path, demo.CONFIGS["smoke"], "viper", {}, repeat=2)
    assert seen[0][1].endswith("reference.sh") and seen[0][-2:] == ["--seed", "5"]


def test_stage_scripts_get_the_demos_interpreter(tmp_path, monkeypatch):
    """`python -m sfc.demo` with a venv's python and no PYTHON set: the stage scripts run that
    interpreter too (they fell back to python3, without torch)."""
    from sfc.demo import runner

    monkeypatch.delenv("PYTHON", raising=False)
    seen = []

    def fake_child(cmd, env, what):
        seen.append(env.get("PYTHON"))
        run = tmp_path / "runs" / "viper" / runner.STAGES[len(seen) - 1][0]
        run.mkdir(parents=True, exist_ok=True)
        (run / "result.json").write_text("{}")

    monkeypatch.setattr(runner, "run_child", fake_child)
    runner.run_stages(tmp_path, runner.CONFIGS["smoke"], "viper", {})
    assert seen == [sys.executable] * len(runner.STAGES)
