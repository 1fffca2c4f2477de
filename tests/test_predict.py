"""`python -m sfc.predict` (issue 12): streaming Accel, its outputs, its errors."""

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import tiny_accel, tiny_segnet

from sfc.data.classes import CITYSCAPES_LUT_12, CITYSCAPES_LUT_15, labelids_of_train_ids
from sfc.models import FlowNetS
from sfc.predict import StreamingAccel
from sfc.predict.cli import main


def _varied_accel():
    accel = tiny_accel()
    with torch.no_grad():  # no class bias: the predictions vary over the frame
        for head in (accel.net_ref.layer6, accel.net_update.layer6):
            for conv in head.conv2d_list:
                conv.bias.zero_()
    return accel


@pytest.mark.parametrize("k", [1, 3])
def test_streaming_is_accel_as_trained(k):
    """A keyframe's output is the reference branch alone; a frame d >= 1 frames after its
    keyframe is `Accel.forward` on the clip (keyframe, ..., frame) — the Accel the stages
    trained, and what `sfc.evaluate --keyframe-distance d` scores."""
    from sfc.models.deeplab import upsample_like

    accel = _varied_accel()
    g = torch.Generator().manual_seed(0)
    flow_imgs = torch.rand(7, 1, 3, 32, 64, generator=g)  # 7 frames
    seg_imgs = flow_imgs * 255 - 110
    stream = StreamingAccel(accel, keyframe_interval=k)
    with torch.no_grad():
        for t in range(7):
            out = stream.step(seg_imgs[t], flow_imgs[t])
            key = t - t % k  # its keyframe
            assert stream.distance == t - key
            if t == key:
                want = upsample_like(accel.net_ref(seg_imgs[t]), (32, 64))
            else:
                clip_s = torch.stack(list(seg_imgs[key:t + 1]), dim=2)  # (1, 3, d+1, H, W)
                clip_f = torch.stack(list(flow_imgs[key:t + 1]), dim=2)
                want = accel(clip_s, clip_f)
            assert torch.allclose(out, want, rtol=0, atol=1e-6), (k, t)
    assert stream.t == 7


@pytest.mark.parametrize("d", [1, 3])
def test_evaluate_at_distance_d_equals_predict_at_distance_d(d):
    """`evaluate_accel(keyframe_distance=d)` on the clip ending at a frame predicts exactly
    what the streaming Accel (interval 5) outputs for that frame, d frames after its
    keyframe."""
    from sfc.evaluate.core import evaluate_accel

    accel = _varied_accel().eval()
    g = torch.Generator().manual_seed(1)
    flow_imgs = torch.rand(d + 1, 1, 3, 32, 64, generator=g)
    seg_imgs = flow_imgs * 255 - 110
    stream = StreamingAccel(accel, keyframe_interval=5)
    with torch.no_grad():
        for t in range(d + 1):
            out = stream.step(seg_imgs[t], flow_imgs[t])
    assert stream.distance == d
    got = []
    batch = {"seg": torch.stack(list(seg_imgs), dim=2), "flow": torch.stack(list(flow_imgs),
                                                                            dim=2),
             "label": torch.zeros(1, 32, 64, dtype=torch.long), "name": ["x"]}
    evaluate_accel(accel, [batch], 15, device="cpu", progress=False, keyframe_distance=d,
                   pred_hook=lambda names, pred: got.append(pred))
    assert torch.equal(got[0], out.argmax(1))


def test_streaming_reference_passes_only_on_keyframes():
    accel = tiny_accel()
    calls = {"ref": 0, "flow": 0, "upd": 0}
    for name, mod in (("ref", accel.net_ref), ("flow", accel.flownet), ("upd", accel.net_update)):
        mod.register_forward_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    stream = StreamingAccel(accel, keyframe_interval=3)
    x = torch.rand(1, 3, 32, 64)
    for _ in range(7):
        stream.step(x, x)
    assert calls == {"ref": 3, "flow": 4, "upd": 4}  # keyframes 0, 3, 6: the reference alone


@pytest.mark.parametrize("classes,lut", [(15, CITYSCAPES_LUT_15), (12, CITYSCAPES_LUT_12)])
def test_label_ids_round_trip_through_the_label_map(classes, lut):
    ids = labelids_of_train_ids(classes)
    assert (lut[ids] == np.arange(classes)).all()
    if classes == 15:
        assert ids[9] == 24  # person (rider is merged into it) is written as person


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict_ckpts")
    torch.save(_varied_accel().state_dict(), d / "accel.pth")
    torch.save(tiny_segnet().state_dict(), d / "segnet.pth")
    torch.save(FlowNetS().state_dict(), d / "sfm.pth")
    return d


def _mp4_frames(path) -> int:
    cap, n = cv2.VideoCapture(str(path)), 0
    while cap.read()[0]:
        n += 1
    return n


def _frames(tiny_data):
    city = sorted((tiny_data / "Cityscapes/leftImg8bit_sequence/val").iterdir())[0]
    return city, sorted(city.glob("*.png"))


def test_predict_a_folder(tiny_data, ckpts, tmp_path, capsys):
    folder, files = _frames(tiny_data)
    out = tmp_path / "pred"
    assert main(["--checkpoint", str(ckpts / "accel.pth"), "--frames", str(folder), "--out",
                 str(out), "--size", "64", "32", "--keyframe-interval", "3", "--limit", "7",
                 "--device", "cpu", "--no-progress"]) == 0
    rec = json.loads((out / "predict.json").read_text())
    names = [f.stem for f in files[:7]]
    assert rec["frames"] == 7 and rec["names"] == names and rec["keyframes"] == [0, 3, 6]
    assert rec["keyframe_interval"] == 3 and rec["keyframe_distances"] == [0, 1, 2, 0, 1, 2, 0]
    assert rec["mode"] == "accel" and rec["size"] == [64, 32] and len(rec["classes"]) == 15
    assert rec["frames_per_s_model"] > 0
    native = Image.open(files[0]).size
    for sub in ("color", "labelIds", "overlay"):
        got = sorted(p.stem for p in (out / sub).glob("*.png"))
        assert got == names, sub
        assert Image.open(out / sub / f"{names[0]}.png").size == native  # the frame's size
    ids = np.asarray(Image.open(out / "labelIds" / f"{names[4]}.png"))
    assert set(np.unique(ids)) <= set(labelids_of_train_ids(15).tolist())
    colour = np.asarray(Image.open(out / "color" / f"{names[4]}.png"))
    train_ids = CITYSCAPES_LUT_15[ids]  # back through the dataset's label map
    from sfc import vis
    from sfc.data.classes import get_protocol

    assert np.array_equal(vis.colorize(train_ids, get_protocol(15).palette), colour)
    cap = cv2.VideoCapture(str(out / "prediction.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 2 * native[0]
    assert _mp4_frames(out / "prediction.mp4") == 7
    printed = capsys.readouterr().out
    assert "7 frames" in printed and "3 keyframes (reference branch), 4 flow-propagated" in printed


def test_video_in_mp4_out(tiny_data, ckpts, tmp_path):
    _, files = _frames(tiny_data)
    video = tmp_path / "drive.mp4"
    first = np.asarray(Image.open(files[0]))
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0,
                        (first.shape[1], first.shape[0]))
    for f in files[:6]:
        w.write(cv2.cvtColor(np.asarray(Image.open(f).convert("RGB")), cv2.COLOR_RGB2BGR))
    w.release()
    out = tmp_path / "pred"
    assert main(["--checkpoint", str(ckpts / "segnet.pth"), "--video", str(video), "--out",
                 str(out), "--size", "64", "32", "--device", "cpu", "--no-progress"]) == 0
    rec = json.loads((out / "predict.json").read_text())
    assert rec["mode"] == "segnet" and rec["frames"] == 6 and rec["keyframes"] is None
    assert sorted(p.name for p in (out / "color").iterdir())[0] == "frame_000000.png"
    cap = cv2.VideoCapture(str(out / "prediction.mp4"))
    assert cap.isOpened() and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    assert _mp4_frames(out / "prediction.mp4") == 6


def test_predict_errors_are_one_line(tiny_data, ckpts, tmp_path, capsys):
    folder, files = _frames(tiny_data)
    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.open(files[0]).save(mixed / "a.png")
    Image.open(files[1]).resize((50, 20)).save(mixed / "b.png")
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"not a video" * 100)
    cases = [
        (["--frames", str(empty)], "no image files"),
        (["--frames", str(mixed)], "frames of different sizes — a.png is"),
        (["--video", str(garbage)], "cannot be read as a video"),
        (["--video", str(tmp_path / "none.mp4")], "no such file"),
        (["--frames", str(folder), "--checkpoint", str(ckpts / "sfm.pth")],
         "neither an Accel nor a SegNet"),
        (["--frames", str(folder), "--keyframe-interval", "0"], "--keyframe-interval 0"),
    ]
    for extra, msg in cases:
        argv = ["--checkpoint", str(ckpts / "accel.pth"), "--out", str(tmp_path / "o"),
                "--size", "64", "32", "--device", "cpu", "--no-progress", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("sfc.predict: error: ") and msg in err, err
        assert "Traceback" not in err


def test_predict_png_as_video_is_one_line_and_writes_nothing(tiny_data, ckpts, tmp_path, capsys):
    _, files = _frames(tiny_data)
    out = tmp_path / "o"
    assert main(["--checkpoint", str(ckpts / "accel.pth"), "--video", str(files[0]), "--out",
                 str(out), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "an image file, not a video" in err and "Traceback" not in err
    assert not out.exists()  # not even the --out folder (nor color/, labelIds/, MP4, JSON)


def _run(ckpts, folder, out, *extra):
    return main(["--checkpoint", str(ckpts / "accel.pth"), "--frames", str(folder), "--out",
                 str(out), "--size", "64", "32", "--keyframe-interval", "3", "--limit", "8",
                 "--device", "cpu", "--no-progress", *map(str, extra)])


def test_predict_sigterm_saves_progress_and_the_same_command_resumes(tiny_data, ckpts,
                                                                     tmp_path, monkeypatch,
                                                                     capsys):
    """SIGTERM after the 4th frame: exit 143, predict.json says 4 of 8 frames, no temporary
    files; the same command resumes from the keyframe at or before the first missing frame and
    ends with exactly the files of an uninterrupted run."""
    import os
    import signal as sig

    from sfc.predict import cli

    folder, _ = _frames(tiny_data)
    assert _run(ckpts, folder, tmp_path / "ref") == 0
    real = cli._Writer.__call__
    calls = {"n": 0}

    def writer_then_term(self, name, rgb, pred):
        real(self, name, rgb, pred)
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), sig.SIGTERM)  # the scheduler's signal, mid-video

    monkeypatch.setattr(cli._Writer, "__call__", writer_then_term)
    out = tmp_path / "run"
    assert _run(ckpts, folder, out) == 143
    assert "interrupted after 4 of 8 frames (SIGTERM)" in capsys.readouterr().err
    rec = json.loads((out / "predict.json").read_text())
    assert rec["complete"] is False and rec["frames"] == 4 and rec["interrupted_by"] == "SIGTERM"
    assert not [p for p in out.rglob(".*")]  # no temporary file left
    assert cv2.VideoCapture(str(out / "prediction.mp4")).isOpened()  # a finalised MP4
    monkeypatch.setattr(cli._Writer, "__call__", real)
    assert _run(ckpts, folder, out) == 0
    rec = json.loads((out / "predict.json").read_text())
    assert rec["complete"] is True and rec["frames"] == 8 and rec["frames_resumed"] == 3
    assert rec["keyframes"] == [0, 3, 6] and rec["keyframe_distances"][:4] == [0, 1, 2, 0]
    for d in ("color", "labelIds", "overlay"):
        for f in sorted((tmp_path / "ref" / d).iterdir()):
            assert (out / d / f.name).read_bytes() == f.read_bytes(), f
    assert _mp4_frames(out / "prediction.mp4") == 8


def test_predict_refuses_another_jobs_out_unless_overwrite(tiny_data, ckpts, tmp_path, capsys):
    folder, _ = _frames(tiny_data)
    out = tmp_path / "o"
    assert _run(ckpts, folder, out) == 0
    capsys.readouterr()
    other = ["--checkpoint", str(ckpts / "segnet.pth"), "--frames", str(folder), "--out",
             str(out), "--size", "64", "32", "--limit", "2", "--device", "cpu", "--no-progress"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "holds the predictions of another job" in err and "--overwrite" in err
    assert main([*other, "--overwrite"]) == 0
    rec = json.loads((out / "predict.json").read_text())
    assert rec["mode"] == "segnet" and rec["frames"] == 2
    assert len(list((out / "color").iterdir())) == 2  # the other job's 8 frames are gone


def test_predict_full_disk_is_one_line_and_leaves_no_broken_file(tiny_data, ckpts, tmp_path,
                                                                 monkeypatch, capsys):
    import errno

    from sfc.predict import cli

    real = cli._atomic_png
    count = {"n": 0}

    def fills_up(img, path):
        count["n"] += 1
        if count["n"] > 7:  # the 3rd frame's second file
            raise OSError(errno.ENOSPC, "No space left on device")
        real(img, path)

    monkeypatch.setattr(cli, "_atomic_png", fills_up)
    folder, _ = _frames(tiny_data)
    out = tmp_path / "o"
    assert _run(ckpts, folder, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err
    assert str(out) in err and "after 2 of 8 frames" in err and "resume" in err
    assert not (out / "prediction.mp4").exists() and not [p for p in out.rglob(".*")]


def test_predict_takes_a_run_directory(tiny_data, tiny_runs, tmp_path):
    """As sfc.train and sfc.evaluate: a run directory stands for its best.pt."""
    folder, _ = _frames(tiny_data)
    out = tmp_path / "pred"
    assert main(["--checkpoint", str(tiny_runs["accel"]), "--frames", str(folder), "--out",
                 str(out), "--limit", "3", "--device", "cpu", "--no-progress"]) == 0
    rec = json.loads((out / "predict.json").read_text())
    assert rec["frames"] == 3 and rec["mode"] == "accel"
    assert rec["checkpoint"] == str(tiny_runs["accel"])  # as given (the job's identity)
