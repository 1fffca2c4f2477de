"""Measuring a video model (issue 12): accuracy against keyframe distance and temporal
consistency, on the synthetic val snippets (30 frames each, the 20th labelled, as the real)."""

import csv
import json

import pytest
import torch
from test_evaluate import tiny_accel, tiny_segnet

from sfc.data import CityscapesSeq
from sfc.evaluate import evaluate_accel, main, make_eval_loader
from sfc.evaluate.temporal import (
    consistency_confusion,
    tc_from_confusion,
    upsample_flow,
    warp_labels,
)
from sfc.models import FlowNetS

SIZE = ("64", "32")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    accel = tiny_accel()
    with torch.no_grad():  # no class bias: the (tiny) features decide, so predictions vary
        for head in (accel.net_ref.layer6, accel.net_update.layer6):
            for conv in head.conv2d_list:
                conv.bias.zero_()
    torch.save(accel.state_dict(), d / "accel.pth")  # the release's Accel layout
    torch.save(tiny_segnet().state_dict(), d / "segnet.pth")
    torch.manual_seed(1)
    torch.save(FlowNetS().state_dict(), d / "flownet.pth")
    return d


def cli(tiny_data, ckpt, tmp_path, *extra):
    js = tmp_path / "r.json"
    rc = main(["--checkpoint", str(ckpt), "--data", str(tiny_data), "--size", *SIZE,
               "--device", "cpu", "--workers", "0", "--no-progress", "--json", str(js),
               *map(str, extra)])
    return rc, json.loads(js.read_text())


def test_keyframe_interval_is_a_deprecated_alias(tiny_data, files, tmp_path, capsys):
    """The old evaluate flag still works, says it is deprecated, and gives the same numbers."""
    _, new = cli(tiny_data, files / "accel.pth", tmp_path, "--keyframe-distance", "1", "3")
    capsys.readouterr()
    _, old = cli(tiny_data, files / "accel.pth", tmp_path, "--keyframe-interval", "1", "3")
    assert "deprecated" in capsys.readouterr().err
    assert old["keyframe_distances"] == new["keyframe_distances"]
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(files / "accel.pth"), "--data", str(tiny_data),
              "--keyframe-interval", "1", "--keyframe-distance", "2"])
    assert e.value.code == 2 and "give one of them" in capsys.readouterr().err


def test_keyframe_distance_one_is_the_default_number(tiny_data, files, tmp_path):
    _, default = cli(tiny_data, files / "accel.pth", tmp_path)
    _, k1 = cli(tiny_data, files / "accel.pth", tmp_path, "--keyframe-distance", "1")
    assert k1["miou"] == default["miou"] and k1["per_class"] == default["per_class"]
    assert default["keyframe_distance"] == 1 and "keyframe_distances" not in default


def test_accuracy_against_keyframe_distance(tiny_data, files, tmp_path):
    _, rec = cli(tiny_data, files / "accel.pth", tmp_path, "--keyframe-distance", "1", "2", "5",
                 "--csv", tmp_path / "r.csv")
    ks = rec["keyframe_distances"]
    assert [r["keyframe_distance"] for r in ks] == [1, 2, 5]
    assert ks[0]["miou"] == rec["miou"] and ks[0]["num_images"] == 2
    # K = 5: the reference branch on frame f-5, propagated through 5 flows (a 6-frame clip)
    ds = CityscapesSeq(tiny_data / "Cityscapes", frames=6, size=(64, 32))
    model = tiny_accel()
    model.load_state_dict(torch.load(files / "accel.pth", weights_only=True))
    want = evaluate_accel(model, make_eval_loader(ds, num_workers=0), 15, progress=False,
                          keyframe_distance=5)
    assert ks[2]["miou"] == pytest.approx(want["miou"], abs=1e-12)
    item = ds[0]
    with torch.no_grad():
        direct = model(item["seg"][None], item["flow"][None])  # Accel.forward, 6 frames
        two = model(item["seg"][None, :, -2:], item["flow"][None, :, -2:])
    assert not torch.equal(direct, two)  # the keyframe distance changes the prediction
    rows = list(csv.reader(open(tmp_path / "r.csv")))
    assert rows[0][4:] == ["iou_k1", "iou_k2", "iou_k5"]
    assert rows[-1][0] == "mIoU" and float(rows[-1][6]) == pytest.approx(ks[2]["miou"], abs=1e-6)


def test_warp_labels_and_flow_scaling():
    labels = torch.arange(12).view(1, 3, 4)
    flow = torch.zeros(1, 2, 3, 4)
    assert torch.equal(warp_labels(labels, flow), labels)
    flow[:, 0] = 1.0  # every pixel samples its right neighbour
    out = warp_labels(labels, flow)
    assert torch.equal(out[..., :3], labels[..., 1:]) and (out[..., 3] == -1).all()
    up = upsample_flow(torch.ones(1, 2, 2, 3), (8, 12))  # ×4 grid: 1 px becomes 4 px
    assert torch.allclose(up, torch.full((1, 2, 8, 12), 4.0))


def test_tc_of_constant_and_shifted_predictions():
    pred = torch.zeros(2, 16, 20, dtype=torch.long)
    pred[:, :, 10:] = 3  # two regions
    zero = torch.zeros(2, 2, 4, 5)  # flow at 1/4 resolution
    tc, per = tc_from_confusion(consistency_confusion(pred, pred.clone(), zero, 15), range(15))
    assert tc == 1.0 and per[0] == per[3] == 1.0 and per[1] is None
    shifted = torch.roll(pred, 1, dims=2)  # the next frame moved by one pixel, zero flow
    tc_s, _ = tc_from_confusion(consistency_confusion(shifted, pred, zero, 15), range(15))
    assert 0.5 < tc_s < 1.0
    # a flow that undoes the shift makes it consistent again (the wrapped column is left out)
    back = torch.zeros(2, 2, 16, 20)
    back[:, 0] = -1.0
    tc_b, _ = tc_from_confusion(consistency_confusion(shifted[..., 1:], pred[..., 1:],
                                                      back[..., 1:], 15), range(15))
    assert tc_b == 1.0


def test_temporal_consistency_in_the_cli(tiny_data, files, tmp_path):
    rc, rec = cli(tiny_data, files / "accel.pth", tmp_path, "--keyframe-distance", "1", "3",
                  "--temporal-consistency", "--tc-flownet", files / "flownet.pth",
                  "--csv", tmp_path / "r.csv")
    assert rc == 0
    tc = rec["temporal_consistency"]
    assert 0.0 < tc["tc"] <= 1.0 and tc["pairs"] == 5 and tc["num_snippets"] == 2
    assert rec["keyframe_distances"][1]["tc"]["tc"] != tc["tc"]  # another K, other predictions
    assert rec["tc_flownet"] == str(files / "flownet.pth")
    rows = list(csv.reader(open(tmp_path / "r.csv")))
    assert rows[-1][0] == "TC" and float(rows[-1][1]) == pytest.approx(tc["tc"], abs=1e-6)
    # a single-frame SegNet is judged with the same flow
    rc, seg = cli(tiny_data, files / "segnet.pth", tmp_path, "--temporal-consistency",
                  "--tc-flownet", files / "flownet.pth")
    assert rc == 0 and 0.0 < seg["temporal_consistency"]["tc"] <= 1.0


@pytest.mark.parametrize("extra,msg", [
    (["--temporal-consistency"], "needs --tc-flow gt"),
    (["--keyframe-distance", "20"], "at most 19"),
    (["--keyframe-distance", "0"], "--keyframe-distance 0"),
    (["--temporal-consistency", "--tc-flownet", "x", "--keyframe-distance", "15"],
     "needs more than the 19 frames"),
])
def test_keyframe_and_tc_flags(extra, msg, tiny_data, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(files / "accel.pth"), "--data", str(tiny_data), *extra])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_keyframe_distance_of_a_segnet_is_refused(tiny_data, files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(files / "segnet.pth"), "--data", str(tiny_data), "--size",
              *SIZE, "--keyframe-distance", "2", "--device", "cpu"])
    assert e.value.code == 2 and "applies to Accel checkpoints" in capsys.readouterr().err


def test_tc_as_deployed_runs_the_streaming_accel(tiny_data, files, tmp_path, capsys):
    """--tc-keyframe-interval N: TC over all consecutive pairs of each snippet's frames up to
    the labelled one, with the streaming Accel (keyframes the reference branch alone); it
    equals a hand-run of StreamingAccel judged by the same flow."""
    from sfc.data import CityscapesSeq
    from sfc.evaluate.checkpoint import build_model, inspect_checkpoint
    from sfc.evaluate.temporal import gt_consistency_confusion, tc_from_confusion
    from sfc.models import StreamingAccel

    rc, rec = cli(tiny_data, files / "accel.pth", tmp_path, "--temporal-consistency",
                  "--tc-flow", "gt", "--tc-keyframe-interval", "1", "5")
    assert rc == 0
    s = {r["keyframe_interval"]: r for r in rec["tc_streaming"]}
    assert sorted(s) == [1, 5] and s[5]["pairs"] == 19 and s[5]["streaming"] is True
    assert "TC as deployed, keyframe interval 5" in capsys.readouterr().out
    ds = CityscapesSeq(tiny_data / "Cityscapes", split="val", frames=20,
                       size=tuple(map(int, SIZE)), gt_flow=True)
    model = build_model(inspect_checkpoint(str(files / "accel.pth"), "accel")).eval()
    cm = torch.zeros(15, 15, dtype=torch.int64)
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            st = StreamingAccel(model, 5)
            preds = [st.step(item["seg"][None, :, t], item["flow"][None, :, t]).argmax(1)
                     for t in range(20)]
            for t in range(1, 20):
                cm += gt_consistency_confusion(preds[t - 1], preds[t],
                                               item["flow_gt"][None, t - 1], 15)
    want, _ = tc_from_confusion(cm, range(15))
    assert s[5]["tc"] == pytest.approx(want, abs=1e-9)


def test_tc_class_means_by_hand():
    """sfc: the mean over classes present in either map; liu: over all evaluated classes, an
    absent class counting 0 (Liu et al.'s code: 0 / (0 + 1e-10))."""
    cm = torch.zeros(15, 15, dtype=torch.int64)
    cm[0, 0] = 10  # class 0: IoU 1
    cm[3, 3], cm[3, 5] = 2, 2  # class 3: 2 / (2 + 2) = 0.5; class 5: 0 / 2 = 0
    tc, per = tc_from_confusion(cm, range(15))
    assert tc == pytest.approx((1 + 0.5 + 0) / 3) and per[7] is None
    liu, _ = tc_from_confusion(cm, range(15), "liu")
    assert liu == pytest.approx(1.5 / 15)
    with pytest.raises(ValueError, match="convention"):
        tc_from_confusion(cm, range(15), "other")


def test_clips_that_run_past_the_labelled_frame(tiny_data):
    """CityscapesSeq(after=A): the clip goes on A frames past the labelled one; the label and
    the frames up to it are those of the clip that ends there; the last frame's flow is NaN."""
    from sfc.data import DatasetError

    root, size = tiny_data / "Cityscapes", tuple(map(int, SIZE))
    short = CityscapesSeq(root, split="val", frames=20, size=size, gt_flow=True)[0]
    whole = CityscapesSeq(root, split="val", frames=20, size=size, gt_flow=True, after=10)[0]
    assert whole["seg"].shape[1] == 30 and whole["flow_gt"].shape[0] == 30
    assert torch.equal(whole["seg"][:, :20], short["seg"])
    assert torch.equal(whole["label"], short["label"]) and whole["name"] == short["name"]
    assert torch.isfinite(whole["flow_gt"][19]).any()  # frame 19 -> 20 now inside the clip
    assert torch.isnan(whole["flow_gt"][29]).all()
    with pytest.raises(DatasetError, match="past annotated frame"):
        CityscapesSeq(root, split="val", frames=20, size=size, after=11)[0]


def test_liu_convention_counts_every_pair_of_the_snippet(tiny_data, files, tmp_path, capsys):
    """--tc-convention liu: all 29 pairs of each 30-frame snippet and the all-class mean; equals
    a hand-run over the whole snippet with the class mean computed in NumPy."""
    import numpy as np

    from sfc.evaluate.checkpoint import build_model, inspect_checkpoint
    from sfc.evaluate.temporal import gt_consistency_confusion

    rc, rec = cli(tiny_data, files / "segnet.pth", tmp_path, "--temporal-consistency",
                  "--tc-flow", "gt", "--tc-convention", "liu")
    assert rc == 0 and "Liu et al.'s" in capsys.readouterr().out
    tc = rec["temporal_consistency"]
    assert tc["pairs"] == 29 and tc["convention"] == "liu" and rec["tc_convention"] == "liu"
    ds = CityscapesSeq(tiny_data / "Cityscapes", split="val", frames=20, after=10,
                       size=tuple(map(int, SIZE)), gt_flow=True)
    model = build_model(inspect_checkpoint(str(files / "segnet.pth"), "segnet")).eval()
    cm = torch.zeros(15, 15, dtype=torch.int64)
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            preds = []
            for t in range(30):
                out = model(item["seg"][None, :, t])
                logits = out[0] if isinstance(out, (tuple, list)) else out
                logits = torch.nn.functional.interpolate(logits, size=item["seg"].shape[-2:],
                                                         mode="bilinear", align_corners=False)
                preds.append(logits.argmax(1))
            for t in range(29):
                cm += gt_consistency_confusion(preds[t], preds[t + 1], item["flow_gt"][None, t],
                                               15)
    m = cm.numpy().astype(np.float64)
    inter, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
    want = float(np.mean(inter / (union + 1e-10)))  # Liu et al.'s formula
    assert tc["tc"] == pytest.approx(want, abs=1e-9)
    # the streaming Accel under the same convention: all 29 pairs too
    _, acc = cli(tiny_data, files / "accel.pth", tmp_path, "--temporal-consistency",
                 "--tc-flow", "gt", "--tc-convention", "liu", "--tc-keyframe-interval", "5",
                 "--keyframe-distance", "1", "3")
    assert acc["tc_streaming"][0]["pairs"] == 29
    assert [r["tc"]["pairs"] for r in acc["keyframe_distances"]] == [28, 26]


def test_tc_pairs_with_the_liu_convention_is_refused(tiny_data, files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(files / "segnet.pth"), "--data", str(tiny_data),
              "--temporal-consistency", "--tc-flow", "gt", "--tc-convention", "liu",
              "--tc-pairs", "3"])
    assert e.value.code == 2 and "does not apply to --tc-convention liu" in capsys.readouterr().err
