"""`python -m sfc.evaluate`: checkpoint formats, JSON/CSV content, errors, predictions."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import EVAL, NATIVE, tiny_accel, tiny_segnet, write_cityscapes

from sfc.data import CityscapesSeq
from sfc.data.classes import get_protocol
from sfc.evaluate import NativeLabels, evaluate_accel, evaluate_segnet, main, make_eval_loader
from sfc.train.runio import CHECKPOINT_FORMAT


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_cityscapes(tmp_path_factory.mktemp("data"), seed=1)


@pytest.fixture(scope="module")
def accel_ref(data_root):
    """tiny_accel() scored directly by the evaluation function (the CLI must agree)."""
    ds = CityscapesSeq(data_root / "Cityscapes", size=EVAL)
    return evaluate_accel(tiny_accel(), make_eval_loader(ds, num_workers=0), 15, progress=False)


def cli(data_root, ckpt, *extra):
    argv = ["--checkpoint", str(ckpt), "--data", str(data_root), "--size", *map(str, EVAL),
            "--device", "cpu", "--workers", "0", "--no-progress", *map(str, extra)]
    return main(argv)


def project_ckpt(path, stage, models, source="viper"):
    """The layout of sfc.train.engine's best.pt / last.pt."""
    torch.save({"format": CHECKPOINT_FORMAT, "stage": stage, "iter": 400,
                "models": {k: m.state_dict() for k, m in models.items()},
                "config": {"stage": stage, "source": source, "layers": [1, 1, 1, 1],
                           "width": 8, "num_classes": 15}, "metric": None}, path)
    return path


def test_project_accel_checkpoint_json_csv(data_root, tmp_path, accel_ref):
    ckpt = project_ckpt(tmp_path / "best.pt", "accel", {"accel": tiny_accel()})
    out_j, out_c = tmp_path / "r.json", tmp_path / "r.csv"
    assert cli(data_root, ckpt, "--json", out_j, "--csv", out_c) == 0
    ref = accel_ref
    rec = json.loads(out_j.read_text())
    assert rec["miou"] == pytest.approx(ref["miou"], abs=1e-12)
    names = get_protocol(15).class_names
    assert list(rec["per_class"]) == names
    assert [rec["per_class"][n] for n in names] == pytest.approx(list(ref["per_class"]))
    assert rec["units"] == "fraction" and rec["num_images"] == 3
    assert rec["protocol"] == "release" and rec["mode"] == "accel"
    assert rec["checkpoint"] == str(ckpt) and rec["checkpoint_which"] == "best"
    assert rec["iteration"] == 400 and rec["source"] == "viper"

    rows = list(csv.reader(open(out_c)))
    assert rows[0] == ["class", "iou", "iou_percent", "in_mean"] and len(rows) == 1 + 15 + 1
    assert rows[-1][0] == "mIoU" and float(rows[-1][1]) == pytest.approx(ref["miou"], abs=1e-6)


def test_release_accel_best_pth_equals_direct_evaluation(data_root, tmp_path, accel_ref):
    model = tiny_accel()
    torch.manual_seed(5)
    sd = dict(model.state_dict())
    # SFC stage two's best.pth: the whole model, incl. flownet_global and the SFM (ignored)
    sd.update({f"flownet_global.{k}": v for k, v in model.flownet.state_dict().items()})
    sd.update({f"sfm.{k}": torch.randn_like(v) for k, v in model.flownet.state_dict().items()})
    torch.save(sd, tmp_path / "best.pth")
    cli(data_root, tmp_path / "best.pth", "--json", tmp_path / "a.json")
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["miou"] == pytest.approx(accel_ref["miou"], abs=1e-12)
    assert list(a["per_class"].values()) == pytest.approx(list(accel_ref["per_class"]))
    assert a["checkpoint_format"] == "release" and a["checkpoint_which"] == "release"


def test_release_segnet_and_project_segnet(data_root, tmp_path):
    net = tiny_segnet()
    ds = CityscapesSeq(data_root / "Cityscapes", size=EVAL)
    ref = evaluate_segnet(net, make_eval_loader(ds, num_workers=0), 15, progress=False)
    # stage-one release wrapper: 'segnet.'-prefixed keys, with layer5
    torch.save({f"segnet.{k}": v for k, v in net.state_dict().items()}, tmp_path / "s1.pth")
    cli(data_root, tmp_path / "s1.pth", "--json", tmp_path / "s1.json")
    # project stage-one run with the SFC networks saved alongside
    from sfc.models import FlowNetS
    project_ckpt(tmp_path / "best.pt", "segnet",
                 {"segnet": net, "flownet_global": FlowNetS(), "sfm": FlowNetS()})
    cli(data_root, tmp_path / "best.pt", "--json", tmp_path / "s2.json")
    for name in ("s1.json", "s2.json"):
        rec = json.loads((tmp_path / name).read_text())
        assert rec["mode"] == "segnet"
        assert rec["miou"] == pytest.approx(ref["miou"], abs=1e-12)


def test_wrong_number_of_classes_is_a_clear_error(data_root, tmp_path, capsys):
    torch.save(tiny_accel(12).state_dict(), tmp_path / "best.pth")
    with pytest.raises(SystemExit) as e:
        cli(data_root, tmp_path / "best.pth", "--source", "viper")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "12 classes" in err and "15-class" in err and "--source synthia_seq" in err
    assert str(tmp_path / "best.pth") in err


def test_sfm_checkpoint_and_missing_data_are_clear_errors(data_root, tmp_path, capsys):
    from sfc.models import FlowNetS
    project_ckpt(tmp_path / "sfm.pt", "sfm", {"sfm": FlowNetS()})
    with pytest.raises(SystemExit):
        cli(data_root, tmp_path / "sfm.pt")
    assert "neither an Accel nor a SegNet" in capsys.readouterr().err
    torch.save(tiny_accel().state_dict(), tmp_path / "a.pth")
    with pytest.raises(SystemExit):
        cli(tmp_path / "nowhere", tmp_path / "a.pth")
    assert "nowhere" in capsys.readouterr().err


def test_full_protocol_and_saved_predictions(data_root, tmp_path):
    model = tiny_accel(12)
    torch.save(model.state_dict(), tmp_path / "best.pth")
    pred_dir = tmp_path / "pred"
    cli(data_root, tmp_path / "best.pth", "--source", "synthia_seq", "--protocol", "full",
        "--json", tmp_path / "r.json", "--save-pred", pred_dir, "--limit", 2)
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["protocol"] == "full" and rec["num_images"] == 2
    assert len(rec["per_class"]) == 11 and list(rec["per_class_not_in_mean"]) == ["fence"]
    ds = NativeLabels(CityscapesSeq(data_root / "Cityscapes", size=EVAL, classes=12))
    proto = get_protocol(12)
    ref = evaluate_accel(model, make_eval_loader(ds, num_workers=0), 12, proto.eval_ids,
                         protocol="full", limit=2, progress=False)
    assert rec["miou"] == pytest.approx(ref["miou"], abs=1e-12)
    pngs = sorted(p.name for p in pred_dir.iterdir())
    assert pngs == ["bonn_000004_000019.png", "ulm_000000_000019.png"]
    img = np.asarray(Image.open(pred_dir / pngs[0]))
    assert img.shape == (NATIVE[1], NATIVE[0], 3)  # at the native label size
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in proto.palette}
