"""Clear DatasetErrors naming the file, and the check CLI's exit codes."""

import shutil

import numpy as np
import pytest
from PIL import Image

from sfc.data import CityscapesSeq, DatasetError, SynthiaSeq, ViperSeq, make_dataset
from sfc.data.check import main as check_main
from sfc.data.synthetic import generate


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    generate(root, seed=1, tiny=True)
    return root


@pytest.fixture
def tree(clean, tmp_path):
    shutil.copytree(clean, tmp_path / "d")
    return tmp_path / "d"


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match=r"VIPER root .*nowhere.* does not exist"):
        ViperSeq(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="Cityscapes root"):
        make_dataset("cityscapes", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("kitti", tmp_path)


def test_wrong_layout(tree):
    shutil.rmtree(tree / "VIPER/train/cls")
    with pytest.raises(DatasetError,
                       match=r"expected folder .*train/cls.*contains \['flow', 'img'\]"):
        ViperSeq(tree / "VIPER")
    with pytest.raises(DatasetError,
                       match=r"expected folder .*sequence/test.*contains \[.train., .val.\]"):
        CityscapesSeq(tree / "Cityscapes", split="test")
    odd = tree / "SynthiaSeq/SEQS-04-DAWN"
    shutil.rmtree(odd / "GT")
    with pytest.raises(DatasetError, match=r"rgb/ \+ label/.*found \['RGB'\]"):
        SynthiaSeq(odd)


def test_missing_previous_frame(tree):
    (tree / "VIPER/train/img/001/001_00009.jpg").unlink()
    assert ("001", 10) not in ViperSeq(tree / "VIPER").items  # scanning skips it ...
    lst = tree / "list.txt"
    lst.write_text("001/001_00010.jpg\n")
    ds = ViperSeq(tree / "VIPER", list_file=lst)  # ... a list file does not
    with pytest.raises(DatasetError, match=r"missing previous frame .*001_00009\.jpg"):
        ds[0]
    cs = CityscapesSeq(tree / "Cityscapes", split="val", frames=3)
    city, seq, f = cs.items[0]
    cs.image_path(city, seq, f - 2).unlink()
    with pytest.raises(DatasetError, match=rf"missing previous frame .*{f - 2:06d}_leftImg8bit"):
        cs[0]
    (tree / "VIPER/train/cls/002/002_00019.png").unlink()
    ds = ViperSeq(tree / "VIPER", prev_label=True)
    with pytest.raises(DatasetError, match=r"previous frame .*002_00019\.png.*prev_label"):
        ds[ds.items.index(("002", 20))]


def test_truncated_image(tree):
    path = tree / "VIPER/train/img/001/001_00020.jpg"
    path.write_bytes(path.read_bytes()[:300])
    ds = ViperSeq(tree / "VIPER")
    with pytest.raises(DatasetError, match=r"unreadable or truncated image .*001_00020\.jpg"):
        ds[ds.items.index(("001", 20))]


def test_unknown_ids(tree):
    path = tree / "VIPER/train/cls/001/001_00010.png"
    ids = np.full((54, 96), 3, np.uint8)
    ids[0, :5] = [40, 41, 99, 3, 3]
    Image.fromarray(ids).save(path)
    with pytest.raises(DatasetError, match=r"001_00010\.png contains ids \[40, 41, 99\]"):
        ViperSeq(tree / "VIPER")[0]
    rgb = tree / "VIPER/train/cls/001/001_00020.png"
    Image.new("RGB", (96, 54)).save(rgb)
    with pytest.raises(DatasetError, match=r"001_00020\.png has PIL mode 'RGB'"):
        ViperSeq(tree / "VIPER")[1]


def test_synthia_8bit_label(tree):
    root = tree / "SynthiaSeq/SEQS-04-DAWN"
    Image.fromarray(np.full((38, 64), 3, np.uint8)).save(
        root / "GT/LABELS/Stereo_Left/Omni_F/000004.png")
    ds = SynthiaSeq(root)
    with pytest.raises(DatasetError, match=r"000004\.png is uint8.*expected a 16-bit"):
        ds[ds.items.index(4)]


def test_check_cli(tree, capsys):
    for ds in ("viper", "cityscapes", "synthia_seq"):
        assert check_main(["--dataset", ds, "--root", str(tree)]) == 0
    assert check_main(["--dataset", "viper", "--root", str(tree / "VIPER"), "--split", "val",
                       "--prev-label"]) == 0
    (tree / "VIPER/train/img/002/002_00020.jpg").write_bytes(b"not a jpeg")
    (tree / "VIPER/train/cls/001/001_00019.png").unlink()
    assert check_main(["--dataset", "viper", "--root", str(tree), "--prev-label"]) == 1
    out = capsys.readouterr().out
    assert "clips: 4  ok: 2  missing: 1  broken: 1" in out
    assert "002_00020.jpg" in out and "001_00019.png" in out
    assert check_main(["--dataset", "cityscapes", "--root", str(tree / "nope")]) == 2
