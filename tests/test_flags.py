"""Flags are checked before any work (issue 11, item 6): one line naming the flag, exit 2;
outputs must be writable; `sfc.evaluate` warns about another input size; `sfc.data.check`
reports labels of another size than their frame."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sfc import train
from sfc.data.check import main as check_main
from sfc.evaluate import main as evaluate_main
from sfc.evaluate.cli import warn_size


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from sfc.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, seed=0, tiny=True, datasets=("viper", "cityscapes"))
    return root


BASE = ["--stage", "segnet", "--imagenet-init", "none", "--layers", "1", "1", "1", "1",
        "--width", "8", "--source-size", "64", "32", "--target-size", "64", "32",
        "--num-workers", "0", "--iters", "1"]


@pytest.mark.parametrize("flags,named", [
    (["--batch-size", "0"], "--batch-size 0"),
    (["--width", "0"], "--width 0"),
    (["--target-size", "0", "32"], "--target-size 0 32"),
    (["--source-size", "64", "4"], "--source-size 64 4"),
    (["--num-workers", "-1"], "--num-workers -1"),
    (["--lr", "-1"], "--lr -1"),
    (["--lr", "nan"], "--lr nan"),
    (["--momentum", "1.5"], "--momentum 1.5"),
    (["--val-limit", "0"], "--val-limit 0"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--layers", "1", "0", "1", "1"], "--layers 1 0 1 1"),
    (["--scale", "0"], "--scale 0"),
    (["--sfc-weight", "-0.1"], "--sfc-weight -0.1"),
    (["--device", "cuda:3"], "--device cuda:3"),
    (["--device", "tpu"], "--device"),
])
def test_train_flags_out_of_range(flags, named, tree, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train.main([*BASE, "--data", str(tree), "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("sfc.train: error: ") and named in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # checked before anything was written


def test_train_out_must_be_writable(tree, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = train.main([*BASE, "--data", str(tree), "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and str(blocker / "run") in err and "cannot write" in err


@pytest.mark.parametrize("flags,named", [
    (["--limit", "0"], "--limit 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--workers", "-2"], "--workers -2"),
    (["--size", "1024", "0"], "--size 1024 0"),
    (["--device", "cuda:3"], "--device cuda:3"),
])
def test_evaluate_flags_out_of_range(flags, named, tmp_path, capsys):
    # the checkpoint does not even exist: the flag is reported first, before any work
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path),
                       *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and named in err and "Traceback" not in err, err


def test_evaluate_outputs_must_be_writable(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flag, path in (("--json", blocker / "r.json"), ("--csv", tmp_path),
                       ("--save-pred", blocker / "pred")):
        with pytest.raises(SystemExit) as e:
            evaluate_main(["--checkpoint", str(tmp_path / "none.pt"), flag, str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{flag} {path}" in err, err
    assert not (tmp_path / "none.pt").exists()


def test_evaluate_warns_about_another_input_size(capsys):
    info = SimpleNamespace(path="run/best.pt", config={"target_size": [1024, 512]})
    warn_size(info, (2048, 1024))
    assert "trained at 1024x512" in capsys.readouterr().err
    warn_size(info, (1024, 512))
    warn_size(SimpleNamespace(path="x.pth", config={}), (64, 32))  # a release file
    assert capsys.readouterr().err == ""


def test_data_check_reports_a_label_of_another_size(tree, capsys):
    assert check_main(["--dataset", "cityscapes", "--root", str(tree)]) == 0
    label = sorted((tree / "Cityscapes" / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    keep = label.read_bytes()
    ids = np.asarray(Image.open(label))
    Image.fromarray(ids[:-2, :-4]).save(label)  # 4 columns and 2 rows short
    try:
        capsys.readouterr()
        assert check_main(["--dataset", "cityscapes", "--root", str(tree)]) == 1
        out = capsys.readouterr().out
        h, w = ids.shape
        assert f"label of ('{label.parent.name}'" in out
        assert f"is {w - 4}x{h - 2}, its frame is {w}x{h}" in out and "broken: 1" in out
    finally:
        label.write_bytes(keep)


def test_writable_dir_probe_without_creating(tmp_path):
    from sfc import flags

    target = tmp_path / "a" / "b"
    assert flags.check_writable_dir(target, "--out", create=False) == target
    assert not (tmp_path / "a").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(flags.FlagError, match="is a file, not a folder"):
        flags.check_writable_dir(tmp_path / "f" / "sub", "--out", create=False)
