"""`python -m sfc.train` turns bad input into one clear line and exit code 2."""

from sfc import train


def test_missing_data_root_is_one_line_error(tmp_path, capsys):
    rc = train.main(["--stage", "segnet", "--data", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "run"), "--imagenet-init", "none"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("sfc.train: error: VIPER root")
    assert str(tmp_path / "nowhere" / "VIPER") in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_missing_imagenet_init_names_the_file(tmp_path, capsys):
    from sfc.data.synthetic import generate

    generate(tmp_path / "data", seed=0, tiny=True, datasets=["viper", "cityscapes"])
    rc = train.main(["--stage", "segnet", "--data", str(tmp_path / "data"),
                     "--out", str(tmp_path / "run"), "--layers", "1", "1", "1", "1",
                     "--width", "8", "--imagenet-init", str(tmp_path / "missing.pth")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "missing.pth" in err and "Traceback" not in err
