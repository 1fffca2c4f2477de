"""Evaluation loops: numbers equal those computed by hand from argmax predictions (method §6)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from sfc.data import CityscapesSeq
from sfc.data.classes import CITYSCAPES_LUT_15, get_protocol
from sfc.evaluate import (
    NativeLabels,
    evaluate_accel,
    evaluate_segnet,
    evaluate_sfm,
    make_eval_loader,
)
from sfc.losses import sfm_loss
from sfc.models import Accel, DeepLabV2, FlowNetS

NATIVE = (128, 64)  # (W, H) of the files: stands in for Cityscapes' 2048×1024
EVAL = (64, 32)     # (W, H) network input: stands in for 1024×512
SNIPPETS = [("ulm", "000000"), ("ulm", "000001"), ("bonn", "000004")]
MAPPED = [7, 8, 11, 13, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 32, 33]


def write_cityscapes(root: Path, seed: int = 0) -> Path:
    """A tiny Cityscapes-Seq val tree in the real layout: per snippet the annotated frame
    ``_000019`` and its predecessor, and a gtFine labelIds PNG (blocky ids, some unmapped)."""
    rng = np.random.default_rng(seed)
    cs = root / "Cityscapes"
    w, h = NATIVE
    for city, seq in SNIPPETS:
        img_dir = cs / "leftImg8bit_sequence" / "val" / city
        gt_dir = cs / "gtFine" / "val" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for f in (18, 19):
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(img_dir / f"{city}_{seq}_{f:06d}_leftImg8bit.png")
        blocks = rng.choice(MAPPED + [0, 4, 17], size=(h // 8, w // 8)).astype(np.uint8)
        ids = np.kron(blocks, np.ones((8, 8), np.uint8))
        ids[rng.random((h, w)) < 0.05] = 25  # thin speckle: nearest resizing loses some
        Image.fromarray(ids, mode="L").save(gt_dir / f"{city}_{seq}_000019_gtFine_labelIds.png")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_cityscapes(tmp_path_factory.mktemp("data"))


def tiny_accel(num_classes=15):
    torch.manual_seed(0)
    return Accel(num_classes, layers=(1, 1, 1, 1), width=8).eval()


def tiny_segnet(num_classes=15):
    torch.manual_seed(0)
    return DeepLabV2(num_classes, multi_level=True, layers=(1, 1, 1, 1), width=8).eval()


def miou_by_hand(preds, labels, num_classes, eval_ids):
    """Loop-free reference: np.add.at confusion matrix, IoU with 0 for absent classes."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for p, lab in zip(preds, labels):
        p, lab = np.asarray(p).ravel(), np.asarray(lab).ravel()
        keep = lab >= 0
        np.add.at(cm, (lab[keep], p[keep]), 1)
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), 0.0)
    return cm, iou[eval_ids].mean()


def test_evaluate_segnet_equals_hand_computation(data_root):
    ds = CityscapesSeq(data_root / "Cityscapes", size=EVAL)
    model = tiny_segnet()
    preds, labels = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            it = ds[i]
            main, _aux = model(it["seg"][None, :, -1])  # main head, 1/8
            up = F.interpolate(main, size=(EVAL[1], EVAL[0]), mode="bilinear",
                               align_corners=False)
            preds.append(up.argmax(1)[0].numpy())
            labels.append(it["label"].numpy())
    cm, miou = miou_by_hand(preds, labels, 15, list(range(15)))
    res = evaluate_segnet(model, make_eval_loader(ds, num_workers=0), 15, progress=False)
    np.testing.assert_array_equal(res["confusion"].numpy(), cm)
    assert res["miou"] == pytest.approx(miou, abs=1e-12)
    assert res["num_images"] == 3 and res["per_class"].shape == (15,)
    assert cm.sum() == sum(int((lab >= 0).sum()) for lab in labels)


def test_evaluate_accel_equals_hand_computation_and_batching(data_root):
    ds = CityscapesSeq(data_root / "Cityscapes", size=EVAL, classes=12)
    model = tiny_accel(12)
    proto = get_protocol(12)
    preds, labels = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            it = ds[i]
            logits = model(it["seg"][None], it["flow"][None])  # (1, C, H, W), input size
            assert logits.shape[-2:] == (EVAL[1], EVAL[0])
            preds.append(logits.argmax(1)[0].numpy())
            labels.append(it["label"].numpy())
    cm, miou = miou_by_hand(preds, labels, 12, proto.eval_ids)
    for bs in (1, 2):
        res = evaluate_accel(model, DataLoader(ds, batch_size=bs), 12, proto.eval_ids,
                             progress=False)
        np.testing.assert_array_equal(res["confusion"].numpy(), cm)
        assert res["miou"] == pytest.approx(miou, abs=1e-12)


def test_limit_and_train_mode_restored(data_root):
    ds = CityscapesSeq(data_root / "Cityscapes", size=EVAL)
    model = tiny_segnet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate_segnet(model, DataLoader(ds, batch_size=2), 15, limit=1, progress=False)
    assert res["num_images"] == 1
    assert res["confusion"].sum().item() == int((ds[0]["label"] >= 0).sum())
    assert model.training  # restored for the training loop
    for k, v in model.state_dict().items():  # eval mode: BN running stats untouched
        assert torch.equal(v, before[k]), k


def test_full_protocol_uses_native_labels(data_root):
    base = CityscapesSeq(data_root / "Cityscapes", size=EVAL)
    ds = NativeLabels(base)
    it = ds[1]
    assert it["label"].shape == (EVAL[1], EVAL[0])
    assert it["label_full"].shape == (NATIVE[1], NATIVE[0])
    city, seq, f = base.items[1]
    ids = np.asarray(Image.open(base.label_path(city, seq, f)))
    np.testing.assert_array_equal(it["label_full"].numpy(), CITYSCAPES_LUT_15[ids])

    model = tiny_accel()
    preds, labels = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            it = ds[i]
            logits = model(it["seg"][None], it["flow"][None])
            up = F.interpolate(logits, size=(NATIVE[1], NATIVE[0]), mode="bilinear",
                               align_corners=False)  # to the label's native size
            preds.append(up.argmax(1)[0].numpy())
            labels.append(it["label_full"].numpy())
    cm, miou = miou_by_hand(preds, labels, 15, list(range(15)))
    res = evaluate_accel(model, make_eval_loader(ds, num_workers=0), 15, protocol="full",
                         progress=False)
    np.testing.assert_array_equal(res["confusion"].numpy(), cm)
    assert res["miou"] == pytest.approx(miou, abs=1e-12)
    assert res["confusion"].sum().item() == sum(int((lab >= 0).sum()) for lab in labels)
    release = evaluate_accel(model, make_eval_loader(ds, num_workers=0), 15, progress=False)
    assert release["confusion"].sum() * 4 != res["confusion"].sum()  # speckle: not a rescale

    with pytest.raises(KeyError, match="NativeLabels"):
        evaluate_accel(model, make_eval_loader(base, num_workers=0), 15, protocol="full",
                       progress=False)


def test_evaluate_sfm_is_mean_of_per_image_means():
    torch.manual_seed(0)
    sfm, fg = FlowNetS().eval(), FlowNetS().eval()
    g = torch.Generator().manual_seed(3)
    items = [{"flow": torch.rand(3, 2, 32, 48, generator=g),
              "label": torch.randint(-1, 4, (32, 48), generator=g),
              "label_prev": torch.randint(-1, 4, (32, 48), generator=g)} for _ in range(3)]
    with torch.no_grad():
        per_image = [float(sfm_loss(it["flow"][None, :, 0], it["flow"][None, :, 1],
                                    it["label_prev"][None], it["label"][None], fg, sfm))
                     for it in items]
    res = evaluate_sfm(sfm, fg, DataLoader(items, batch_size=2), progress=False)
    assert res["num_images"] == 3
    assert res["epe"] == pytest.approx(np.mean(per_image), rel=1e-6)
    assert evaluate_sfm(sfm, fg, DataLoader(items, batch_size=2), limit=1,
                        progress=False)["epe"] == pytest.approx(per_image[0], rel=1e-6)
