"""Ground-truth optical flow: formats, the generator's flow, Flying Chairs, flow evaluation, TC
judged by ground truth (issue 15)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfc.data import DatasetError
from sfc.data.flow_io import read_flo, read_viper_flow, resize_flow, write_flo, write_viper_flow
from sfc.data.flowsets import FlyingChairs, make_flow_set
from sfc.data.synthetic.chairs import write_flying_chairs
from sfc.data.synthetic.scene import CANON, Scene, forward_flow
from sfc.data.synthetic.styles import CITYSCAPES_STYLE, VIPER_STYLE
from sfc.evaluate.flow import flow_error_sums, summarise
from sfc.evaluate.temporal import gt_consistency_confusion, tc_from_confusion
from sfc.models import FlowNetS
from sfc.models.warp import warp


# ---- formats --------------------------------------------------------------------------------
def test_flo_roundtrip_and_unknown(tmp_path):
    rng = np.random.default_rng(0)
    flow = rng.normal(0, 5, (7, 9, 2)).astype(np.float32)
    flow[2, 3] = np.nan
    write_flo(tmp_path / "a.flo", flow)
    raw = (tmp_path / "a.flo").read_bytes()
    # the Middlebury layout, read independently: magic, width, height, then u, v interleaved
    assert np.frombuffer(raw[:4], "<f4")[0] == np.float32(202021.25)
    assert tuple(np.frombuffer(raw[4:12], "<i4")) == (9, 7)
    body = np.frombuffer(raw[12:], "<f4").reshape(7, 9, 2)
    assert body[2, 3, 0] == np.float32(1e10)  # unknown, as the Middlebury code writes it
    back = read_flo(tmp_path / "a.flo")
    assert np.isnan(back[2, 3]).all() and np.isnan(back).sum() == 2
    ok = ~np.isnan(flow)
    assert np.array_equal(back[ok], flow[ok])


def test_flo_bad_files_are_one_clear_error(tmp_path):
    (tmp_path / "bad.flo").write_bytes(b"JUNK" + b"\0" * 20)  # ("PIEH" is the magic)
    with pytest.raises(DatasetError, match="not a Middlebury .flo"):
        read_flo(tmp_path / "bad.flo")
    write_flo(tmp_path / "t.flo", np.zeros((4, 4, 2), np.float32))
    (tmp_path / "t.flo").write_bytes((tmp_path / "t.flo").read_bytes()[:-8])
    with pytest.raises(DatasetError, match="truncated"):
        read_flo(tmp_path / "t.flo")
    with pytest.raises(DatasetError, match="missing flow file"):
        read_flo(tmp_path / "none.flo")


def test_viper_npz_roundtrip_float16_nan_and_limit(tmp_path):
    flow = np.array([[[1.5, -2.25], [np.nan, 0.0]], [[600.0, 1.0], [-3.0, 513.0]]], np.float32)
    write_viper_flow(tmp_path / "001_00010.npz", flow)
    with np.load(tmp_path / "001_00010.npz") as z:  # VIPER's own format: float16 u and v
        assert sorted(z.files) == ["u", "v"] and z["u"].dtype == np.float16
        assert z["u"][0, 0] == np.float16(1.5) and z["v"][0, 0] == np.float16(-2.25)
    back = read_viper_flow(tmp_path / "001_00010.npz")
    assert back.shape == (2, 2, 2) and back.dtype == np.float32
    assert np.array_equal(back[0, 0], [1.5, -2.25]) and np.array_equal(back[0, 1], [np.nan] * 2,
                                                                         equal_nan=True)
    assert np.isnan(back[1, 0]).all() and np.isnan(back[1, 1]).all()  # |u| or |v| > 512
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(DatasetError, match="expected 'u' and 'v'"):
        read_viper_flow(tmp_path / "x.npz")


def test_resize_flow_scales_values_and_keeps_nan_local():
    flow = np.zeros((4, 8, 2), np.float32)
    flow[..., 0], flow[..., 1] = 8.0, 4.0
    flow[1, 1] = np.nan  # the pixel that output (0, 0) samples at half size: ⌊(0 + ½)·2⌋ = 1
    flow[0, 0] = np.nan  # not sampled at all
    out = resize_flow(flow, (4, 2))  # half size: values halve
    assert out.shape == (2, 4, 2)
    assert np.isnan(out[0, 0]).all() and np.isnan(out).sum() == 2
    assert np.allclose(out[1, 1], [4.0, 2.0])
    # the sampled pixels are PIL NEAREST's: compare on an index image
    idx = np.arange(13 * 17, dtype=np.float32).reshape(13, 17)
    pil = np.asarray(Image.fromarray(idx).resize((7, 5), Image.NEAREST))
    ours = resize_flow(np.stack([idx, idx], 2), (7, 5))[..., 0] * (17 / 7)
    assert np.allclose(ours, pil)


# ---- the generator's ground truth -----------------------------------------------------------
def test_generator_flow_aligns_the_next_frame():
    """Warping frame t+1 back with the ground-truth flow reproduces frame t on valid pixels far
    better than no warp (noise-free style, so the residual is the renderer's sub-pixel
    rounding and texture aliasing)."""
    style = dataclasses.replace(VIPER_STYLE, noise=0.0, blur=0.0)
    err, err0, valid_frac = [], [], []
    for k in range(3):
        scene = Scene(np.random.default_rng([5, k]), ego="ego")
        for t in (0, 9):
            c0, c1 = scene.paint(t, 256, 128, style), scene.paint(t + 1, 256, 128, style)
            flow = forward_flow(c0, c1)
            v = ~np.isnan(flow[..., 0])
            a = torch.from_numpy(scene.shade(c0, style, np.random.default_rng(0))).float()
            b = torch.from_numpy(scene.shade(c1, style, np.random.default_rng(0))).float()
            b = b.permute(2, 0, 1)[None]
            wb = warp(b, torch.from_numpy(np.nan_to_num(flow)).permute(2, 0, 1)[None])
            d = (wb[0].permute(1, 2, 0) - a).abs().mean(2).numpy()
            d0 = (b[0].permute(1, 2, 0) - a).abs().mean(2).numpy()
            err.append(d[v].mean())
            err0.append(d0[v].mean())
            valid_frac.append(v.mean())
    assert np.mean(err) < 0.35 * np.mean(err0)
    assert 0.6 < np.mean(valid_frac) < 0.99  # some pixels are occluded or leave the frame


def _bus_scene(px_per_frame: int, w: int = 64) -> Scene:
    """A hand-built scene: no camera motion, no forward motion, one bus moving
    `px_per_frame` pixels a frame to the right over a static street."""
    s = Scene(np.random.default_rng(3), ego=None)
    s.cam_v, s.fwd_v = 0.0, 0.0
    s.trees, s.hedges, s.fences, s.poles, s.people, s.riders = [], [], [], [], [], []
    s.buildings = [(-0.5, 1.5, 0.1, 1.0, 0.05)]
    s.vehicles = [("bus", 40 / 64, 0.8, px_per_frame / w, 0)]  # exact binary fractions
    return s


def test_invalid_pixels_are_exactly_the_occluded_and_out_of_frame_ones():
    w, h, v = 64, 32, 4
    s = _bus_scene(v)
    bus = CANON.index("bus")
    for t in (0, 1, 2, 3):  # the bus reaches the right border and leaves the frame
        c0, c1 = s.paint(t, w, h, VIPER_STYLE), s.paint(t + 1, w, h, VIPER_STYLE)
        flow = forward_flow(c0, c1)
        m0, m1 = c0.cls == bus, c1.cls == bus
        # the rasterised bus moves by exactly v pixels (what the rest of the test relies on)
        shifted = np.zeros_like(m0)
        shifted[:, v:] = m0[:, :-v]
        assert np.array_equal(shifted, m1)
        cols = np.arange(w)[None, :].repeat(h, 0)
        leaves = m0 & (cols + v > w - 1)          # bus pixels moving out of the frame
        covered = ~m0 & m1                         # background hidden by the bus at t+1
        expected = leaves | covered
        assert np.array_equal(np.isnan(flow[..., 0]), expected)
        assert np.allclose(flow[m0 & ~leaves], [v, 0.0])
        assert np.allclose(flow[~m0 & ~covered], 0.0, atol=1e-4)  # the static street


def test_flow_magnitude_at_the_demo_size():
    """Mean |flow| >= 2 px at 128 px width, independently moving objects above the camera."""
    mags, movers, cams = [], [], []
    for k in range(6):
        s = Scene(np.random.default_rng([0, 1, 1, k]), ego="ego")
        for t in (0, 10, 20):
            c0, c1 = s.paint(t, 128, 64, CITYSCAPES_STYLE), s.paint(t + 1, 128, 64,
                                                                   CITYSCAPES_STYLE)
            f = forward_flow(c0, c1)
            v = ~np.isnan(f[..., 0])
            m = np.hypot(f[..., 0], f[..., 1])
            mags.append(m[v])
            moving = np.isin(c0.cls, [CANON.index(n) for n in ("car", "truck", "bus", "person",
                                                                  "rider", "bicycle",
                                                                  "motorcycle")])
            movers.append(m[v & moving])
            cams.append(abs(s.cam_v) * 128)  # the nearest layers' scroll, px a frame
    assert min(cams) >= 2.3 - 1e-6
    assert np.concatenate(mags).mean() >= 2.0
    assert np.concatenate(movers).mean() > 1.3 * np.mean(cams)


def test_written_trees_hold_readable_consistent_flow(tiny_data):
    viper = make_flow_set("viper", tiny_data, split="train", size=None)
    target = make_flow_set("synthetic_target", tiny_data, split="val", size=(48, 24))
    assert len(viper) == 2 * 20 and len(target) == 2 * 29  # every frame but a sequence's last
    it = target[0]
    assert it["img1"].shape == (3, 24, 48) and it["flow_gt"].shape == (2, 24, 48)
    assert it["flow_gt"].dtype == torch.float32
    for ds in (viper, target):
        e, e0 = [], []
        for i in range(0, len(ds), 7):
            x = ds[i]
            valid = torch.isfinite(x["flow_gt"]).all(0)
            wb = warp(x["img2"][None], torch.nan_to_num(x["flow_gt"])[None])[0]
            e.append((wb - x["img1"]).abs().mean(0)[valid].mean())
            e0.append((x["img2"] - x["img1"]).abs().mean(0)[valid].mean())
        assert np.mean(e) < 0.8 * np.mean(e0)


# ---- Flying Chairs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chairs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chairs")
    write_flying_chairs(root / "FlyingChairs", count=20, size=(64, 48), seed=0)
    return root


def test_flying_chairs_layout(chairs_root):
    d = chairs_root / "FlyingChairs"
    files = sorted(p.name for p in (d / "FlyingChairs_release" / "data").iterdir())
    assert files[:3] == ["00001_flow.flo", "00001_img1.ppm", "00001_img2.ppm"]
    assert len(files) == 60
    marks = (d / "FlyingChairs_train_val.txt").read_text().split()
    assert marks == ["2" if i % 10 == 0 else "1" for i in range(1, 21)]
    assert Image.open(d / "FlyingChairs_release" / "data" / "00001_img1.ppm").format == "PPM"
    tr, va = FlyingChairs(d, "train"), FlyingChairs(d, "val")
    assert len(tr) == 18 and len(va) == 2 and va.pairs[0][3] == "00010"
    x = tr[0]
    assert torch.isfinite(x["flow_gt"]).all()  # dense, as the real Flying Chairs
    wb = warp(x["img2"][None], x["flow_gt"][None])[0]
    h, w = x["flow_gt"].shape[1:]
    xs = torch.arange(w) + x["flow_gt"][0]
    ys = torch.arange(h)[:, None] + x["flow_gt"][1]
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    assert (wb - x["img1"]).abs().mean(0)[inside].mean() < \
        0.6 * (x["img2"] - x["img1"]).abs().mean(0)[inside].mean()


def test_flying_chairs_errors(chairs_root, tmp_path):
    with pytest.raises(DatasetError, match="FlyingChairs_train_val.txt"):
        (tmp_path / "c" / "FlyingChairs_release" / "data").mkdir(parents=True)
        FlyingChairs(tmp_path / "c", "train")
    (tmp_path / "c" / "FlyingChairs_train_val.txt").write_text("1\n1\n")
    with pytest.raises(DatasetError, match="one line per sample"):
        FlyingChairs(tmp_path / "c", "train")


def test_multiscale_epe_matches_a_direct_computation():
    from sfc.losses import MULTISCALE_WEIGHTS, multiscale_epe

    torch.manual_seed(0)
    target = torch.randn(2, 2, 32, 64) * 10
    pyr = [torch.randn(2, 2, 32 >> k, 64 >> k) for k in range(5)]
    want = 0.0
    for w, out, k in zip(MULTISCALE_WEIGHTS, pyr, range(5)):
        f = 1 << k  # area downsampling by an integer factor = average pooling
        t = torch.nn.functional.avg_pool2d(target / 20.0, f) if f > 1 else target / 20.0
        want += w * float(((out - t) ** 2).sum(1).sqrt().sum()) / 2
    assert float(multiscale_epe(pyr, target)) == pytest.approx(want, rel=1e-5)


def test_flownet_stage_beats_the_zero_baseline(tmp_path):
    """A short CPU run of `--stage flownet` on a small synthetic Flying Chairs (64×48, motions
    ×3 so that they are not sub-pixel at the 1/4 grid): after 300 steps the val EPE falls below
    the zero-flow baseline (5.153 vs 5.180 px on 2026-12-04: a thin margin, the run is seeded
    and single-threaded) and below its first evaluation; the export loads as --chairs-init.
    (From scratch a FlowNetS sits near the zero-flow plateau for hundreds of steps; the demo's
    1500 steps at 128×96 reach 0.62 of the baseline.)"""
    root = tmp_path / "data"
    write_flying_chairs(root / "FlyingChairs", count=200, size=(64, 48), seed=1, motion=3.0)
    out = tmp_path / "run"
    rc = subprocess.run([sys.executable, "-m", "sfc.train", "--stage", "flownet", "--data",
                         str(root), "--out", str(out), "--iters", "300", "--eval-every", "100",
                         "--lr", "1e-3", "--num-workers", "0", "--device", "cpu"],
                        capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert res["monitor"] == "epe" and res["last"]["iter"] == 300
    assert res["last"]["value"] < res["last"]["epe_zero"]
    vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epes = [x["epe"] for x in vals if x["split"] == "val"]
    assert len(epes) == 3 and epes[-1] < epes[0]
    from sfc.train.inputs import chairs_init, load_chairs_into

    for arg in (out, out / "best.pt", out / "flownet_flyingchairs_pretrained.pth"):
        net = FlowNetS()
        load_chairs_into(net, chairs_init(str(arg)))
        best = torch.load(out / "best.pt", weights_only=True)["models"]["flownet"]
        assert torch.equal(net.state_dict()["predict_flow2.weight"], best["predict_flow2.weight"])


# ---- flow evaluation ------------------------------------------------------------------------
def constant_flownet(u: float, v: float) -> FlowNetS:
    """A FlowNetS whose output is the constant flow (u, v) in full-resolution pixels: zero
    weights, predict_flow2's bias = (u, v) / 20 (flow2 × 5 is 1/4-grid px, × 4 full-res)."""
    net = FlowNetS()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.predict_flow2.bias.copy_(torch.tensor([u, v]) / 20.0)
    return net


def test_flow_error_sums_known_answers():
    gt = torch.zeros(1, 2, 4, 4)
    gt[:, 0] = 4.0
    gt[:, :, :2] = float("nan")  # the top half is invalid
    pred = torch.zeros(1, 2, 4, 4)
    r = summarise(flow_error_sums(pred, gt))
    assert r["valid_pixels"] == 8 and r["epe"] == pytest.approx(4.0)
    assert r["epe_zero"] == pytest.approx(4.0) and r["fl_all"] == r["fl_all_zero"] == 1.0
    pred[:, 1] = 3.0  # (0, 3) vs (4, 0): EPE 5 > 3 and > 5 % of 4
    pred[:, 0] = 4.0  # (4, 3) vs (4, 0): EPE 3, not > 3: no outlier
    r = summarise(flow_error_sums(pred, gt))
    assert r["epe"] == pytest.approx(3.0) and r["fl_all"] == 0.0


def test_flow_cli_on_a_hand_built_set(tiny_data, tmp_path):
    """`sfc.evaluate --flow`: a tree whose ground truth is a constant (4, 0), judged for the zero
    network (EPE 4), the exact network (EPE 0) and a constant (4, 3) (EPE 3)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data / "Cityscapes", root / "Cityscapes")
    flos = sorted((root / "Cityscapes" / "flow_synthetic" / "val").rglob("*.flo"))[:4]
    for p in sorted((root / "Cityscapes" / "flow_synthetic" / "val").rglob("*.flo")):
        if p not in flos:
            p.unlink()
    for p in flos:
        f = np.zeros_like(read_flo(p))
        f[..., 0] = 4.0
        f[:4] = np.nan  # invalid rows
        write_flo(p, f)
    h, w = read_flo(flos[0]).shape[:2]
    for name, (u, v), want in (("zero", (0, 0), 4.0), ("exact", (4, 0), 0.0),
                               ("off", (4, 3), 3.0)):
        torch.save(constant_flownet(u, v).state_dict(), tmp_path / f"{name}.pth")
        r = subprocess.run([sys.executable, "-m", "sfc.evaluate", "--flow", "--checkpoint",
                            str(tmp_path / f"{name}.pth"), "--data", str(root), "--flow-set",
                            "synthetic_target", "--size", str(w), str(h), "--workers", "0",
                            "--json", str(tmp_path / f"{name}.json"), "--csv",
                            str(tmp_path / f"{name}.csv"), "--no-progress"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        rec = json.loads((tmp_path / f"{name}.json").read_text())
        assert rec["num_pairs"] == 4 and rec["valid_pixels"] == 4 * (h - 4) * w
        assert rec["epe"] == pytest.approx(want, abs=1e-4)
        assert rec["epe_zero"] == pytest.approx(4.0) and rec["fl_all_zero"] == 1.0
        assert "EPE / zero baseline" in r.stdout
        assert (tmp_path / f"{name}.csv").read_text().splitlines()[0].startswith("checkpoint,")


@pytest.mark.parametrize("extra,msg", [
    ([], "--flow needs --flow-set"),
    (["--flow-set", "viper"], "VIPER ground-truth flow"),
    (["--flow-set", "flying_chairs"], "Flying Chairs images"),
])
def test_flow_cli_bad_input_is_one_line(extra, msg, tmp_path):
    torch.save(constant_flownet(0, 0).state_dict(), tmp_path / "f.pth")
    r = subprocess.run([sys.executable, "-m", "sfc.evaluate", "--flow", "--checkpoint",
                        str(tmp_path / "f.pth"), "--data", str(tmp_path), *extra],
                       capture_output=True, text=True)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_load_flownet_never_takes_the_sfm_unless_asked(tmp_path):
    from sfc.evaluate.checkpoint import load_flownet
    from sfc.flags import BAD_INPUT

    a, b = FlowNetS(), FlowNetS()
    ck = {"format": "sfc-run-v1", "stage": "segnet", "iter": 1, "config": {},
          "models": {"flownet_global": a.state_dict(), "sfm": b.state_dict()}}
    torch.save(ck, tmp_path / "sfc1.pt")
    net, which = load_flownet(tmp_path / "sfc1.pt")
    assert which.startswith("flownet_global")
    assert torch.equal(net.conv1[0].weight, a.conv1[0].weight)
    net, which = load_flownet(tmp_path / "sfc1.pt", "sfm")
    assert which.startswith("sfm") and torch.equal(net.conv1[0].weight, b.conv1[0].weight)
    torch.save({**ck, "models": {"sfm": b.state_dict()}}, tmp_path / "sfm.pt")
    with pytest.raises(BAD_INPUT, match="only an SFM"):
        load_flownet(tmp_path / "sfm.pt")


# ---- temporal consistency judged by ground truth --------------------------------------------
def test_tc_gt_is_one_for_a_prediction_moving_with_the_flow():
    prev = torch.zeros(1, 12, 16, dtype=torch.long)
    prev[:, 3:8, 4:9] = 5
    prev[:, 9:, :] = 2
    cur = torch.roll(prev, 3, dims=2)  # the scene moved 3 px to the right
    fwd = torch.zeros(1, 2, 12, 16)
    fwd[:, 0] = 3.0
    fwd[:, :, :, 13:] = float("nan")  # those pixels leave the frame: invalid
    tc, per = tc_from_confusion(gt_consistency_confusion(prev, cur, fwd, 15), range(15))
    assert tc == 1.0 and per[5] == 1.0 and per[2] == 1.0
    still = torch.zeros(1, 2, 12, 16)  # the same predictions judged as if nothing moved
    tc0, _ = tc_from_confusion(gt_consistency_confusion(prev, cur, still, 15), range(15))
    assert tc0 < 0.9


def test_tc_gt_runs_in_the_cli(tiny_data, tmp_path):
    from sfc.models import Accel

    torch.manual_seed(0)
    accel = Accel(15, layers=(1, 1, 1, 1), width=8)
    torch.save(accel.state_dict(), tmp_path / "accel.pth")
    r = subprocess.run([sys.executable, "-m", "sfc.evaluate", "--checkpoint",
                        str(tmp_path / "accel.pth"), "--data", str(tiny_data), "--size", "48",
                        "24", "--workers", "0", "--temporal-consistency", "--tc-flow", "gt",
                        "--json", str(tmp_path / "r.json"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["tc_flow"] == "gt" and rec["tc_judge"].startswith("ground-truth")
    assert "TC judged by: ground-truth flow" in r.stdout
    assert 0.0 < rec["temporal_consistency"]["tc"] <= 1.0


def test_middlebury_stereo_pair_zero_baseline_is_the_mean_disparity():
    skdata = pytest.importorskip("skimage.data")
    from torch.utils.data import DataLoader

    from sfc.evaluate.flow import evaluate_flow

    _, _, disp = skdata.stereo_motorcycle()
    ok = np.isfinite(disp)
    ds = make_flow_set("middlebury_stereo", ".")
    item = ds[0]
    assert item["img1"].shape == (3, 500, 741)
    assert torch.isfinite(item["flow_gt"]).all(0).sum() == ok.sum()
    res = evaluate_flow(constant_flownet(0, 0), DataLoader(ds), progress=False)
    assert res["valid_pixels"] == ok.sum()
    assert res["epe"] == pytest.approx(res["epe_zero"], rel=1e-6)
    assert res["epe_zero"] == pytest.approx(float(disp[ok].mean()), rel=1e-5)
    # the flow is (-d, 0): a constant (-mean d, 0) prediction is already far better than zero
    res = evaluate_flow(constant_flownet(-float(disp[ok].mean()), 0), DataLoader(ds),
                        progress=False)
    assert res["epe"] < 0.5 * res["epe_zero"]


def test_premise_command(tiny_data, tmp_path):
    """`python -m sfc.evaluate.premise`: a FlowNetS on the source's and the target's ground
    truth (a zero network scores exactly the zero baseline on both), a SegNet on both val sets;
    bad input is one line, exit 2."""
    from sfc.models import DeepLabV2

    torch.save(constant_flownet(0, 0).state_dict(), tmp_path / "zero.pth")
    torch.save(DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8).state_dict(),
               tmp_path / "seg.pth")
    r = subprocess.run([sys.executable, "-m", "sfc.evaluate.premise", "--data", str(tiny_data),
                        "--flownet", str(tmp_path / "zero.pth"), "--segnet",
                        str(tmp_path / "seg.pth"), "--source-size", "48", "27",
                        "--target-size", "48", "24", "--json", str(tmp_path / "p.json"),
                        "--no-progress", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "p.json").read_text())
    f = rec["flownets"][0]
    for dom in ("source", "target"):
        assert f[dom]["epe"] == pytest.approx(f[dom]["epe_zero"], rel=1e-6)
        assert f[dom]["epe_zero"] > 0.3 and f[dom]["num_pairs"] > 0
    assert f["source"]["flow_set"] == "viper" and f["source"]["split"] == "val"
    assert f["epe_ratio_target_source"] == pytest.approx(f["target"]["epe"] / f["source"]["epe"])
    s = rec["segnets"][0]
    assert s["miou_drop"] == pytest.approx(s["source"]["miou"] - s["target"]["miou"])
    assert "SFC's premise" in r.stdout and "tgt/src" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "sfc.evaluate.premise", "--data", str(tiny_data),
                          "--flownet", str(tmp_path / "missing.pth")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.pth" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_magnitude_percentiles_against_numpy():
    from sfc.evaluate.flow import magnitude_histogram, percentile

    rng = np.random.default_rng(0)
    gt = torch.from_numpy(rng.normal(0, 3, (2, 2, 40, 50)).astype(np.float32))
    gt[0, :, :5] = float("nan")
    h = magnitude_histogram(gt)
    mag = torch.linalg.vector_norm(gt.double(), dim=1)
    mag = mag[torch.isfinite(mag)].numpy()
    assert float(h.sum()) == mag.size
    for q in (50, 95):
        assert abs(percentile(h, q) - np.percentile(mag, q)) <= 1 / 16 + 1e-9


def test_evaluate_takes_run_directories_and_the_trained_size(tiny_runs, tiny_data, tmp_path):
    """A run directory is accepted as --checkpoint (its best.pt), and without --size the
    evaluation runs at the size the run was trained at (as sfc.predict does)."""
    run = tiny_runs["accel"]
    r = subprocess.run([sys.executable, "-m", "sfc.evaluate", "--checkpoint", str(run),
                        "--data", str(tiny_data), "--workers", "0", "--no-progress",
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "r.json").read_text())
    trained = json.loads((Path(run) / "config.json").read_text())["config"]["target_size"]
    assert rec["input_size"] == trained and "trained at" not in r.stderr


def test_evaluate_data_error_in_a_worker_is_one_line(tiny_data, tmp_path):
    """A truncated frame read by a DataLoader worker: the same one line as with 0 workers."""
    import shutil

    from sfc.models import Accel

    root = tmp_path / "data"
    shutil.copytree(tiny_data / "Cityscapes", root / "Cityscapes")
    frame = sorted((root / "Cityscapes/leftImg8bit_sequence/val").rglob("*_000018_*.png"))[0]
    frame.write_bytes(frame.read_bytes()[:200])  # truncated
    torch.save(Accel(15, layers=(1, 1, 1, 1), width=8).state_dict(), tmp_path / "a.pth")
    errs = []
    for workers in ("0", "2"):
        r = subprocess.run([sys.executable, "-m", "sfc.evaluate", "--checkpoint",
                            str(tmp_path / "a.pth"), "--data", str(root), "--size", "48", "24",
                            "--workers", workers, "--no-progress"], capture_output=True,
                           text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = [ln for ln in r.stderr.strip().splitlines() if "error" in ln]
        assert len(lines) == 1 and frame.name in lines[0]
        errs.append(lines[0])
    assert errs[0] == errs[1]


def test_snippets_without_a_label_are_counted_and_flagged(tiny_data, tmp_path):
    """A val snippet whose gtFine label is missing: sfc.evaluate says how many are left out
    (and records it); sfc.data.check flags them (exit 1)."""
    import shutil

    from sfc.data.check import main as check_main
    from sfc.models import Accel

    root = tmp_path / "data"
    shutil.copytree(tiny_data / "Cityscapes", root / "Cityscapes")
    label = sorted((root / "Cityscapes/gtFine/val").rglob("*_gtFine_labelIds.png"))[0]
    snippet = "_".join(label.name.split("_")[:2])
    label.unlink()
    torch.save(Accel(15, layers=(1, 1, 1, 1), width=8).state_dict(), tmp_path / "a.pth")
    r = subprocess.run([sys.executable, "-m", "sfc.evaluate", "--checkpoint",
                        str(tmp_path / "a.pth"), "--data", str(root), "--size", "48", "24",
                        "--workers", "0", "--no-progress", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"1 val snippets under {root / 'Cityscapes'} have frames but no gtFine label" in \
        r.stderr and snippet in r.stderr
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["snippets_without_label"] == 1 and rec["num_images"] == 1
    assert check_main(["--dataset", "cityscapes", "--root", str(root)]) == 1
    assert check_main(["--dataset", "cityscapes", "--root", str(tiny_data)]) == 0
