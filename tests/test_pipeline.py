"""The whole chain: the seven scripts at tiny size on a synthetic tree, each consuming the
previous stages' outputs as a user would, then `python -m sfc.evaluate` on the final model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TINY = ["--iters", "2", "--eval-every", "2", "--val-limit", "2", "--layers", "1", "1", "1",
        "1", "--width", "8", "--source-size", "64", "32", "--num-workers", "0"]
CHAIN = [  # (script, extra arguments, run dir)
    ("FlowNet_pretrain/stage_one/script/update.sh", ["--target-size", "64", "32",
                                                      "--imagenet-init", "none"],
     "FlowNet_pretrain/stage_one/update"),
    ("FlowNet_pretrain/stage_one/script/reference.sh", ["--target-size", "64", "32",
                                                         "--imagenet-init", "none"],
     "FlowNet_pretrain/stage_one/reference"),
    ("FlowNet_pretrain/stage_two/script/train.sh", ["--target-size", "64", "32",
                                                     "--chairs-init", "none"],
     "FlowNet_pretrain/stage_two/train"),
    ("SFM/script/train.sh", [], "SFM/train"),
    ("SFC/stage_one/script/update.sh", ["--target-size", "64", "32", "--imagenet-init", "none"],
     "SFC/stage_one/update"),
    ("SFC/stage_one/script/reference.sh", ["--target-size", "64", "32",
                                           "--imagenet-init", "none"],
     "SFC/stage_one/reference"),
    ("SFC/stage_two/script/train.sh", ["--target-size", "64", "32", "--chairs-init", "none"],
     "SFC/stage_two/train"),
]


def _env(tmp_path, **extra):
    env = dict(os.environ, SFC_DATA=str(tmp_path / "data"), SFC_OUT=str(tmp_path / "out"),
               SFC_WEIGHTS=str(tmp_path / "weights"), PYTHON=sys.executable, **extra)
    for k in ("LAUNCH", "DRY_RUN", "SOURCE"):
        env.pop(k, None)
    env.update(extra)
    return env


@pytest.mark.slow
def test_seven_script_chain_then_evaluate(tmp_path):
    from sfc.data.synthetic import generate

    generate(tmp_path / "data", seed=0, tiny=True)
    out = tmp_path / "out" / "viper"
    for script, extra, run in CHAIN:
        proc = subprocess.run(["bash", str(REPO / "exp" / script), *TINY, *extra],
                              env=_env(tmp_path), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        res = json.loads((out / run / "result.json").read_text())
        assert res["last"]["iter"] == 2 and res["checkpoint_best"] == "best.pt"
        assert res["monitor"] == ("epe" if script.startswith("SFM") else "miou")
        if res["monitor"] == "miou":
            assert 0.0 <= res["best"]["value"] <= 1.0 and len(res["per_class_last"]) == 15
        else:
            assert res["best"]["value"] > 0 and res["per_class_last"] is None
        for f in ("config.json", "log.txt", "metrics.jsonl", "last.pt", "best.pt"):
            assert (out / run / f).is_file(), f"{run}/{f}"
    # the stages consumed each other's outputs
    log = (out / "SFC/stage_two/train/log.txt").read_text()
    assert str(out / "SFC/stage_one/update/best.pt") in log
    assert str(out / "SFM/train/best.pt") in log
    final = torch.load(out / "SFC/stage_two/train/best.pt", weights_only=True)
    assert set(final["models"]) == {"accel", "flownet_global", "sfm"}
    # SFC stage one saw the target stream and its SFC term
    train_logs = [json.loads(x) for x in
                  (out / "SFC/stage_one/update/metrics.jsonl").read_text().splitlines()]
    assert any("sfc" in x for x in train_logs if x["split"] == "train")

    # TensorBoard pictures at each evaluation (prediction|label, and SF next to the flow)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run, tags in (("SFC/stage_one/update", {"pred|label", "flow/SF|OF"}),
                      ("SFC/stage_two/train", {"pred|label", "flow/SF|OF"}),
                      ("SFM/train", {"flow/SF_gt|OF"})):
        ea = EventAccumulator(str(out / run / "tb"))
        ea.Reload()
        assert set(ea.Tags()["images"]) == tags, run
        assert "val_iou/road" in ea.Tags()["scalars"] or run == "SFM/train"

    # evaluation of the final model: the same number as the in-training validation
    js = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sfc.evaluate", "--checkpoint",
         str(out / "SFC/stage_two/train/best.pt"), "--data", str(tmp_path / "data"),
         "--size", "64", "32", "--limit", "2", "--workers", "0", "--no-progress",
         "--json", str(js)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads(js.read_text())
    res = json.loads((out / "SFC/stage_two/train/result.json").read_text())
    assert abs(ev["miou"] - res["best"]["value"]) < 1e-9

