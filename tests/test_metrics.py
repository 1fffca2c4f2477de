"""Confusion matrix, IoU and the result writers against hand-computed values (method §6)."""

import csv
import json

import numpy as np
import pytest
import torch

from sfc.data.classes import get_protocol
from sfc.evaluate.metrics import (
    confusion_matrix,
    format_table,
    iou_from_confusion,
    metrics_record,
    write_csv,
    write_json,
)

# 2×3 image, C = 3; the -1 pixel is ignored (its prediction 0 must not count as an FP of 0).
LABEL = torch.tensor([[0, 0, 1], [1, 2, -1]])
PRED = torch.tensor([[0, 1, 1], [2, 2, 0]])
# cm[label, pred] by hand: (0,0) (0,1) (1,1) (1,2) (2,2)
CM = np.array([[1, 1, 0],
               [0, 1, 1],
               [0, 0, 1]])
# IoU: class 0: 1/(2+1-1)=1/2, class 1: 1/(2+2-1)=1/3, class 2: 1/(1+2-1)=1/2
IOU = np.array([1 / 2, 1 / 3, 1 / 2])


def test_confusion_matrix_hand_computed():
    cm = confusion_matrix(PRED, LABEL, 3)
    assert cm.dtype == torch.int64 and cm.shape == (3, 3)
    np.testing.assert_array_equal(cm.numpy(), CM)


def test_confusion_matrix_ignores_out_of_range_and_255():
    label = torch.tensor([0, 255, 3, -1, 1, 1])
    pred = torch.tensor([0, 0, 0, 1, 7, 1])  # pred 7 out of range: skipped too
    cm = confusion_matrix(pred, label, 3)
    expect = np.zeros((3, 3), np.int64)
    expect[0, 0] = 1
    expect[1, 1] = 1
    np.testing.assert_array_equal(cm.numpy(), expect)


def test_confusion_matrix_batched_equals_reference():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(-1, 5, (3, 17, 23), generator=g)
    pred = torch.randint(0, 5, (3, 17, 23), generator=g)
    ref = np.zeros((5, 5), np.int64)
    for lab, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if lab >= 0:
            ref[lab, p] += 1
    np.testing.assert_array_equal(confusion_matrix(pred, label, 5).numpy(), ref)
    # sum of per-image matrices = matrix of the batch
    per = sum(confusion_matrix(pred[i], label[i], 5) for i in range(3))
    np.testing.assert_array_equal(per.numpy(), ref)


def test_confusion_matrix_rejects_logits_and_shape_mismatch():
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2).long(), 3)


def test_iou_hand_computed():
    iou, miou = iou_from_confusion(torch.from_numpy(CM))
    np.testing.assert_allclose(iou, IOU)
    assert miou == pytest.approx(4 / 9)


def test_absent_class_counts_as_zero():
    cm = np.zeros((4, 4), np.int64)
    cm[:3, :3] = CM  # class 3: no pixel in label or prediction
    iou, miou = iou_from_confusion(cm)
    assert iou[3] == 0.0
    assert miou == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 0) / 4)  # = 1/3, not 4/9
    _, miou3 = iou_from_confusion(cm, eval_ids=[0, 1, 2])
    assert miou3 == pytest.approx(4 / 9)


def test_eleven_of_twelve_protocol():
    proto = get_protocol(12)
    assert len(proto.eval_ids) == 11 and 3 not in proto.eval_ids
    cm = np.diag(np.arange(1, 13)).astype(np.int64)  # every class perfect ...
    cm[3, 3] = 0
    cm[3, 0] = 5  # ... except fence (train id 3): all 5 fence pixels predicted as road
    # road: TP 1, FP 5 -> 1/6; fence 0 (not averaged); the other 10 classes 1.
    iou, miou = iou_from_confusion(cm, proto.eval_ids)
    assert iou[0] == pytest.approx(1 / 6) and iou[3] == 0.0
    assert miou == pytest.approx((1 / 6 + 10) / 11)
    rec = metrics_record(iou, miou, proto.class_names, proto.eval_ids, num_images=2)
    assert "fence" not in rec["per_class"] and rec["per_class_not_in_mean"] == {"fence": 0.0}
    assert np.mean(list(rec["per_class"].values())) == pytest.approx(rec["miou"])


def test_json_csv_and_table(tmp_path):
    iou, miou = iou_from_confusion(CM)
    rec = metrics_record(iou, miou, ["road", "sidewalk", "building"], num_images=7,
                         protocol="release", checkpoint="runs/best.pt")
    write_json(tmp_path / "r.json", rec)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back["miou"] == pytest.approx(4 / 9) and back["units"] == "fraction"
    assert back["per_class"] == pytest.approx({"road": 0.5, "sidewalk": 1 / 3, "building": 0.5})
    assert back["num_images"] == 7 and back["protocol"] == "release"
    assert back["checkpoint"] == "runs/best.pt"

    write_csv(tmp_path / "sub" / "r.csv", rec)
    rows = list(csv.reader(open(tmp_path / "sub" / "r.csv")))
    assert rows[0] == ["class", "iou", "iou_percent", "in_mean"]
    assert rows[2] == ["sidewalk", "0.333333", "33.33", "1"]
    assert rows[-1] == ["mIoU", "0.444444", "44.44", "1"]

    table = format_table(rec)
    assert "33.33" in table and "44.44" in table and "runs/best.pt" in table
