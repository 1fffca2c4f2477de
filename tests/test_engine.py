"""The training engine: resume equality, finished runs, atomic checkpoints, non-finite losses."""

import json
import multiprocessing as mp
import os

import pytest
import torch

from sfc import train
from sfc.train import runio

TINY = ["--layers", "1", "1", "1", "1", "--width", "8", "--source-size", "64", "32",
        "--target-size", "64", "32", "--num-workers", "0", "--val-limit", "2",
        "--imagenet-init", "none", "--log-every", "1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from sfc.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0, tiny=True, datasets=("viper", "cityscapes"))
    return root


def _segnet(data_root, out, *extra):
    return train.main(["--stage", "segnet", "--data", str(data_root), "--out", str(out),
                       *TINY, *extra])


def _models(path):
    return runio.load_checkpoint(path)["models"]


def test_resume_equals_uninterrupted(data_root, tmp_path):
    common = ["--iters", "4", "--eval-every", "4", "--seed", "3"]
    assert _segnet(data_root, tmp_path / "a", *common) == 0
    # interrupted after 2 iterations (as SIGINT would), then the same command again resumes
    b = tmp_path / "b"
    assert _segnet(data_root, b, *common, "--stop-after", "2") == 0
    ck = runio.load_checkpoint(b / "last.pt")
    assert ck["iter"] == 2 and not (b / "result.json").exists()
    assert ck["streams"]["source"]["consumed"] >= 1 and "rng" in ck
    assert _segnet(data_root, b, *common, "--stop-after", "2") == 0
    ma, mb = _models(tmp_path / "a" / "last.pt"), _models(b / "last.pt")
    for k, v in ma["segnet"].items():
        assert torch.equal(v, mb["segnet"][k]), k  # parameters and BN statistics
    ra = json.loads((tmp_path / "a" / "result.json").read_text())
    rb = json.loads((b / "result.json").read_text())
    assert ra == rb
    assert ra["stage"] == "segnet" and ra["monitor"] == "miou" and ra["last"]["iter"] == 4
    # deferred finiteness checks (flags on the device, a discarded-update selection every
    # step): the same parameters, BN statistics and results as reading every check at once
    c = tmp_path / "c"
    assert _segnet(data_root, c, *common, "--check-every", "3", "--log-every", "100") == 0
    mc = _models(c / "last.pt")
    assert all(torch.equal(v, mc["segnet"][k]) for k, v in ma["segnet"].items())
    assert json.loads((c / "result.json").read_text()) == ra
    assert "read every 3 iterations" in (c / "log.txt").read_text()
    assert 0.0 <= ra["last"]["value"] <= 1.0 and len(ra["per_class_last"]) == 15
    log = (b / "log.txt").read_text()
    assert "resumed from" in log and "at iteration 2" in log
    # training moved the parameters away from the (seeded) initialisation
    from sfc.models import DeepLabV2

    torch.manual_seed(3)
    init = DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8).state_dict()
    assert not torch.equal(init["layer6.conv2d_list.0.weight"],
                           ma["segnet"]["layer6.conv2d_list.0.weight"])


def test_finished_run_is_not_retrained(data_root, tmp_path, capsys):
    args = ["--iters", "2", "--eval-every", "1"]
    assert _segnet(data_root, tmp_path, *args) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["config"]["stage"] == "segnet" and cfg["version"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines if x["split"] == "val"] == [1, 2]
    assert {"seg", "lr"} <= set(next(x for x in lines if x["split"] == "train"))
    assert any(f.name.startswith("events") for f in (tmp_path / "tb").iterdir())
    before = (tmp_path / "last.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert _segnet(data_root, tmp_path, *args) == 0
    assert "already finished" in capsys.readouterr().out
    assert (tmp_path / "last.pt").stat().st_mtime_ns == before


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        train.main(["--stage", "segnet", "--out", "x", "--no-such-flag"])
    assert "unrecognized arguments" in capsys.readouterr().err
    assert train.main(["--stage", "accel", "--out", "x", "--chairs-init", "none"]) == 2
    assert "--update-ckpt" in capsys.readouterr().err


def test_later_flags_override_earlier():
    args = train.resolve(train.build_parser().parse_args(
        ["--stage", "segnet", "--out", "x", "--iters", "5", "--iters", "7",
         "--imagenet-init", "none"]))
    assert args.iters == 7 and args.lr == 2.5e-4 and args.eval_every == 2000
    assert args.num_classes == 15 and args.source_size == [1280, 720]
    s = train.resolve(train.build_parser().parse_args(
        ["--stage", "sfm", "--out", "x", "--source", "synthia_seq", "--flownet-ckpt", "f"]))
    assert (s.lr, s.weight_decay, s.eval_every, s.num_classes) == (1e-4, 4e-4, 4000, 12)
    assert s.source_size == [1280, 640] and len(s.eval_ids) == 11


def _killed_writer(path):
    """Child: start overwriting `path`, die (os._exit) half-way through the write."""
    def dying_save(obj, f, *a, **k):
        f.write(b"\x00" * 1000)
        f.flush()
        os._exit(9)

    torch.save = dying_save
    runio.atomic_save({"format": runio.CHECKPOINT_FORMAT, "iter": 999}, path)


def test_atomic_checkpoint_survives_killed_writer(tmp_path):
    path = tmp_path / "last.pt"
    runio.atomic_save({"format": runio.CHECKPOINT_FORMAT, "iter": 7, "w": torch.ones(3)}, path)
    proc = mp.get_context("fork").Process(target=_killed_writer, args=(path,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 9
    ck = runio.load_checkpoint(path)  # the previous checkpoint, intact
    assert ck["iter"] == 7 and torch.equal(ck["w"], torch.ones(3))


def test_non_finite_loss_stops_without_overwriting(data_root, tmp_path, monkeypatch, capsys):
    from sfc import losses

    real = losses.seg_loss
    calls = {"n": 0}

    def flaky(logits, gt):
        out = real(logits, gt)
        if isinstance(logits, tuple):  # one top-level call per iteration (main, aux)
            calls["n"] += 1
            if calls["n"] == 3:
                return out * float("nan")
        return out

    monkeypatch.setattr(losses, "seg_loss", flaky)
    rc = _segnet(data_root, tmp_path, "--iters", "4", "--eval-every", "2")
    assert rc == 3
    out = capsys.readouterr().out
    assert "non-finite loss at iteration 3" in out and "'seg'" in out
    assert runio.load_checkpoint(tmp_path / "last.pt")["iter"] == 2  # last good one kept
    assert not (tmp_path / "result.json").exists()


def _nan_at(monkeypatch, iteration):
    """seg_loss returns NaN in the given 1-based training iteration."""
    from sfc import losses

    real, calls = losses.seg_loss, {"n": 0}

    def flaky(logits, gt):
        out = real(logits, gt)
        if isinstance(logits, tuple):  # one top-level call per iteration (main, aux)
            calls["n"] += 1
            if calls["n"] == iteration:
                return out * float("nan")
        return out

    monkeypatch.setattr(losses, "seg_loss", flaky)


@pytest.mark.parametrize("extra,found_after", [(["--iters", "8"], 4),
                                               (["--iters", "8", "--stop-after", "3"], 3)])
def test_deferred_nan_stops_at_the_next_read_with_last_untouched(
        data_root, tmp_path, monkeypatch, capsys, extra, found_after):
    """A NaN loss in iteration 3 with --check-every 5: found at the evaluation boundary after
    iteration 4 (or by the save of --stop-after 3, which reads first): exit 3, the same
    iteration and term as the immediate check, last.pt still iteration 2's."""
    _nan_at(monkeypatch, 3)
    rc = _segnet(data_root, tmp_path, "--eval-every", "2", "--check-every", "5",
                 "--log-every", "100", *extra)
    out = capsys.readouterr().out
    assert rc == 3
    assert "non-finite loss at iteration 3 (term 'seg')" in out
    assert f"found by the check after iteration {found_after}" in out
    assert runio.load_checkpoint(tmp_path / "last.pt")["iter"] == 2
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["reason"] == "nonfinite" and status["exit_status"] == 3


def test_rng_state_roundtrip():
    import random

    import numpy as np

    runio.seed_everything(5)
    state = runio.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    runio.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_sfm_stage_on_synthia_holds_out_last_frames(tmp_path):
    """SYNTHIA-Seq has no source val split: the SFM stage holds out the last N frames."""
    from sfc.data.synthetic import generate
    from sfc.models import FlowNetS

    generate(tmp_path / "data", seed=0, tiny=True, datasets=("synthia_seq",))
    flownet = tmp_path / "flownet_source_well_trained.pth"  # a release-format FlowNet file
    torch.save(FlowNetS().state_dict(), flownet)
    args = ["--stage", "sfm", "--source", "synthia_seq", "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "run"), "--iters", "2", "--eval-every", "2",
            "--source-size", "64", "32", "--num-workers", "0", "--synthia-val-frames", "3",
            "--flownet-ckpt", str(flownet)]
    cfg = train.resolve(train.build_parser().parse_args(args))
    data = train.build_data(cfg)
    names_train = {data.source.items[i] for i in range(len(data.source))}
    names_val = {data.val.items[i] for i in range(len(data.val))}
    assert len(names_val) == 3 and not names_train & names_val
    assert max(names_train) < min(names_val)  # the last frames are the val split
    assert train.main(args) == 0
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["monitor"] == "epe" and res["last"]["value"] > 0 and res["per_class_last"] is None
    best = runio.load_checkpoint(tmp_path / "run" / "best.pt")
    assert set(best["models"]) == {"sfm", "flownet_global"}


def test_sigint_saves_last_and_same_command_resumes(data_root, tmp_path, monkeypatch):
    import signal

    from sfc import losses

    real = losses.seg_loss
    calls = {"n": 0}

    def interrupting(logits, gt):
        if isinstance(logits, tuple):
            calls["n"] += 1
            if calls["n"] == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during iteration 1
        return real(logits, gt)

    monkeypatch.setattr(losses, "seg_loss", interrupting)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup/&
    args = ["--iters", "2", "--eval-every", "2"]
    assert _segnet(data_root, tmp_path, *args) == 128 + signal.SIGINT
    assert runio.load_checkpoint(tmp_path / "last.pt")["iter"] == 1
    assert "stopped at iteration 1 (SIGINT)" in (tmp_path / "log.txt").read_text()
    assert _segnet(data_root, tmp_path, *args) == 0
    assert json.loads((tmp_path / "result.json").read_text())["last"]["iter"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored


def _signals_in_iteration_1(monkeypatch, seconds_between):
    """SIGTERM twice during iteration 1, `seconds_between` apart on the engine's clock."""
    import signal

    from sfc import losses
    from sfc.train import engine

    clock = {"t": 100.0}
    monkeypatch.setattr(engine, "_clock", lambda: clock["t"])
    real, calls = losses.seg_loss, {"n": 0}

    def interrupting(logits, gt):
        if isinstance(logits, tuple):
            calls["n"] += 1
            if calls["n"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                clock["t"] += seconds_between
                os.kill(os.getpid(), signal.SIGTERM)
        return real(logits, gt)

    monkeypatch.setattr(losses, "seg_loss", interrupting)


def test_a_signal_delivered_twice_at_once_is_one_stop(data_root, tmp_path, monkeypatch):
    """The job step's SIGTERM and a launcher's forward of it (torchrun) reach a worker within
    moments: one stop, last.pt saved, exit 143 — not the second signal's give-up."""
    _signals_in_iteration_1(monkeypatch, 0.05)
    assert _segnet(data_root, tmp_path, "--iters", "2", "--eval-every", "2") == 143
    assert runio.load_checkpoint(tmp_path / "last.pt")["iter"] == 1


def test_a_second_signal_later_gives_up_at_once(data_root, tmp_path, monkeypatch):
    _signals_in_iteration_1(monkeypatch, 5.0)
    with pytest.raises(KeyboardInterrupt):
        _segnet(data_root, tmp_path, "--iters", "2", "--eval-every", "2")
    assert not (tmp_path / "last.pt").exists()


def test_every_flag_has_help():
    for action in train.build_parser()._actions:
        assert action.help, action.option_strings


def test_accel_sfc_resume_equals_uninterrupted(tiny_data, tiny_runs, tmp_path):
    """SFC stage two (Accel, 3-frame target stream, frozen flownet_global and SFM): stopped
    after 2 of 5 iterations and resumed, it ends bit-identical to an uninterrupted run."""
    from conftest import TINY_TRAIN

    def run(out, *extra):
        return train.main(["--stage", "accel", "--data", str(tiny_data), "--out", str(out),
                           *TINY_TRAIN, "--chairs-init", "none", "--iters", "5",
                           "--eval-every", "2", "--warmup-iters", "2", "--sfc-weight", "0.001",
                           "--update-ckpt", str(tiny_runs["segnet"]),
                           "--reference-ckpt", str(tiny_runs["segnet"]),
                           "--flownet-ckpt", str(tiny_runs["accel"]),
                           "--sfm-ckpt", str(tiny_runs["sfm"]), "--seed", "2", *extra])

    assert run(tmp_path / "a") == 0
    b = tmp_path / "b"
    assert run(b, "--stop-after", "3") == 0
    ck = runio.load_checkpoint(b / "last.pt")
    assert ck["iter"] == 3 and ck["streams"]["target"]["consumed"] == 3
    assert run(b) == 0
    ma, mb = _models(tmp_path / "a" / "last.pt"), _models(b / "last.pt")
    assert set(ma) == {"accel", "flownet_global", "sfm"}
    for net in ma:
        for k, v in ma[net].items():
            assert torch.equal(v, mb[net][k]), f"{net}.{k}"
    assert (json.loads((tmp_path / "a" / "result.json").read_text())
            == json.loads((b / "result.json").read_text()))
    sfc_terms = [json.loads(x).get("sfc") for x in (b / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["split"] == "train"]
    assert len(sfc_terms) == 5 and all(t is not None and t > 0 for t in sfc_terms)
