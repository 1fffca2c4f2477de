"""Checkpoint loaders on synthetic state dicts written in each foreign format."""

import hashlib

import pytest
import torch

from sfc.checkpoints import (
    CheckpointFormatError,
    load_deeplab_init,
    load_flownet_chairs,
    load_release_accel,
    load_release_flownet,
    load_release_segnet,
    read_state_dict,
)
from sfc.models import Accel, DeepLabV2, FlowNetS

pytestmark = pytest.mark.usefixtures("single_thread")


def _save(obj, path):
    torch.save(obj, path)
    return path


def _same(a, b, prefix=""):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


@pytest.fixture
def seg(small_backbone):
    return lambda c=15, ml=False: DeepLabV2(num_classes=c, multi_level=ml, **small_backbone)


# ---- read_state_dict ---------------------------------------------------------------------------
def test_read_state_dict_errors_and_unwrapping(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="garbage.pth.*weights_only=True"):
        read_state_dict(bad)
    sd = {"a.weight": torch.ones(2)}
    for wrap in ({"state_dict": sd}, {"model": sd}, sd):
        got = read_state_dict(_save(wrap, tmp_path / "w.pth"))
        assert list(got) == ["a.weight"] and torch.equal(got["a.weight"], torch.ones(2))
    with pytest.raises(CheckpointFormatError, match="non-tensor entries: step"):
        read_state_dict(_save({"a": torch.ones(1), "step": 3}, tmp_path / "n.pth"))
    with pytest.raises(CheckpointFormatError, match="weights_only"):  # arbitrary pickles refused
        read_state_dict(_save({"m": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pth"))


# ---- DeepLab-v2 init ---------------------------------------------------------------------------
def test_load_deeplab_init(tmp_path, seg):
    src = seg(c=21, ml=True)  # its own classifier (layer5) has another class count: skipped
    sd = {"Scale." + k: v for k, v in src.state_dict().items()
          if not k.endswith("num_batches_tracked") and not k.startswith("layer6.")}
    assert any(k.startswith("Scale.layer5.") for k in sd)
    path = _save(sd, tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth")
    model = seg(c=15, ml=True)
    head5 = model.layer5.conv2d_list[0].weight.clone()
    head6 = model.layer6.conv2d_list[0].bias.clone()
    digest = load_deeplab_init(model, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, v in model.state_dict().items():
        if k.startswith(("layer5.", "layer6.")) or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, src.state_dict()[k]), k
    assert torch.equal(model.layer5.conv2d_list[0].weight, head5)  # keeps its init
    assert torch.equal(model.layer6.conv2d_list[0].bias, head6)


def test_load_deeplab_init_errors(tmp_path, seg):
    good = {"Scale." + k: v for k, v in seg().state_dict().items() if not k.startswith("layer6")}
    no_prefix = _save({k[6:]: v for k, v in good.items()}, tmp_path / "bare.pth")
    with pytest.raises(CheckpointFormatError, match=r"bare\.pth.*Scale\.conv1\.weight"):
        load_deeplab_init(seg(), no_prefix)
    missing = dict(good)
    del missing["Scale.layer2.0.conv2.weight"]
    path = _save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointFormatError,
                       match=r"missing\.pth.*missing keys \(1\): layer2\.0\.conv2\.weight"):
        load_deeplab_init(seg(), path)
    extra = dict(good, **{"Scale.fc.weight": torch.zeros(3)})
    with pytest.raises(CheckpointFormatError, match=r"unexpected keys \(1\): fc\.weight"):
        load_deeplab_init(seg(), _save(extra, tmp_path / "extra.pth"))


# ---- FlowNetS ----------------------------------------------------------------------------------
def test_load_flownet_chairs_and_release_flownet(tmp_path):
    src, dst = FlowNetS(), FlowNetS()
    path = _save(src.state_dict(), tmp_path / "flownet_flyingchairs_pretrained.pth")
    assert load_flownet_chairs(dst, path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _same(src, dst)
    dst = FlowNetS()
    load_release_flownet(dst, _save({"module." + k: v for k, v in src.state_dict().items()},
                                    tmp_path / "dp.pth"))
    assert _same(src, dst)
    sd = src.state_dict()
    del sd["predict_flow2.bias"]
    with pytest.raises(CheckpointFormatError,
                       match=r"short\.pth.*FlowNetS.*missing keys \(1\): predict_flow2\.bias"):
        load_flownet_chairs(FlowNetS(), _save(sd, tmp_path / "short.pth"))
    sd = dict(src.state_dict(), **{"conv7.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointFormatError, match=r"unexpected keys \(1\): conv7\.0\.weight"):
        load_release_flownet(FlowNetS(), _save(sd, tmp_path / "long.pth"))


# ---- release SegNet ----------------------------------------------------------------------------
def test_load_release_segnet_formats(tmp_path, seg):
    src = seg(ml=True)
    wrapper = {"segnet." + k: v for k, v in src.state_dict().items()}
    p_wrap = _save(wrapper, tmp_path / "src_only_one_stage_update.pth")
    p_bare = _save(src.state_dict(), tmp_path / "SFC_one_stage_update.pth")
    for path in (p_wrap, p_bare):
        multi = seg(ml=True)
        load_release_segnet(multi, path)
        assert _same(src, multi)
        single = seg(ml=False)  # how Accel is built from stage one: layer5 dropped
        load_release_segnet(single, path)
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in single.state_dict().items())
    # a single-level file into a multi-level model: its aux classifier is missing
    single_sd = seg(ml=False).state_dict()
    with pytest.raises(CheckpointFormatError, match=r"nolayer5\.pth.*missing keys.*layer5\."):
        load_release_segnet(seg(ml=True), _save(single_sd, tmp_path / "nolayer5.pth"))


def test_load_release_segnet_class_mismatch(tmp_path, seg):
    path = _save(seg(c=19).state_dict(), tmp_path / "cityscapes19.pth")
    with pytest.raises(CheckpointFormatError,
                       match=r"cityscapes19\.pth.*shape mismatch.*19 classes in the file, 15 in"):
        load_release_segnet(seg(c=15), path)


def test_load_release_segnet_foreign_keys(tmp_path, seg):
    sd = {"segnet." + k: v for k, v in seg().state_dict().items()}
    sd["criterion.weight"] = torch.ones(15)
    with pytest.raises(CheckpointFormatError, match=r"unexpected keys \(1\): criterion\.weight"):
        load_release_segnet(seg(), _save(sd, tmp_path / "mixed.pth"))


# ---- release Accel -----------------------------------------------------------------------------
def test_load_release_accel(tmp_path, small_backbone):
    src = Accel(num_classes=4, **small_backbone)
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    sd.update({"module.flownet_global." + k: v for k, v in FlowNetS().state_dict().items()})
    sd.update({"module.sfm." + k: v for k, v in FlowNetS().state_dict().items()})
    dst = Accel(num_classes=4, **small_backbone)
    load_release_accel(dst, _save(sd, tmp_path / "best.pth"))
    assert _same(src, dst)
    bare = src.state_dict()
    del bare["merge.bias"]
    with pytest.raises(CheckpointFormatError,
                       match=r"accel\.pth.*Accel.*missing keys \(1\): merge\.bias"):
        load_release_accel(Accel(num_classes=4, **small_backbone),
                           _save(bare, tmp_path / "accel.pth"))
    other = Accel(num_classes=6, **small_backbone).state_dict()
    with pytest.raises(CheckpointFormatError, match=r"6 classes in the file, 4 in the model"):
        load_release_accel(dst, _save(other, tmp_path / "six.pth"))
