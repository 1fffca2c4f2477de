"""Label maps and protocols against method §2, entry by entry (expected values typed from it)."""

import numpy as np
import pytest

from sfc.data import classes as C

# method §2.2: VIPER id -> train id
SPEC_VIPER = {3: 0, 4: 1, 9: 2, 11: 3, 13: 4, 14: 5, 7: 6, 8: 6, 6: 7, 2: 8, 20: 9, 24: 10,
              27: 11, 26: 12, 23: 13, 22: 14}
# method §2.3: Cityscapes labelId -> train id, 15 classes (rider 25 -> person 9) and 12 classes
SPEC_CS15 = {7: 0, 8: 1, 11: 2, 13: 3, 19: 4, 20: 5, 21: 6, 22: 7, 23: 8, 24: 9, 25: 9, 26: 10,
             27: 11, 28: 12, 32: 13, 33: 14}
SPEC_CS12 = {7: 0, 8: 1, 11: 2, 13: 3, 17: 4, 19: 5, 20: 6, 21: 7, 23: 8, 24: 9, 25: 10, 26: 11}
# method §2.4: SYNTHIA id -> train id (11 bicycle -> 10 "rider")
SPEC_SYNTHIA = {3: 0, 4: 1, 2: 2, 5: 3, 7: 4, 15: 5, 9: 6, 6: 7, 1: 8, 10: 9, 11: 10, 8: 11}


@pytest.mark.parametrize("lut, spec", [
    (C.VIPER_LUT_15, SPEC_VIPER), (C.CITYSCAPES_LUT_15, SPEC_CS15),
    (C.CITYSCAPES_LUT_12, SPEC_CS12), (C.SYNTHIA_LUT_12, SPEC_SYNTHIA)])
def test_lut_entry_by_entry(lut, spec):
    assert lut.dtype == np.int64 and lut.shape == (256,)
    for i in range(256):
        assert lut[i] == spec.get(i, C.IGNORE), f"id {i}"


def test_lut_maps_whole_arrays():
    ids = np.array([[25, 26], [0, 255]], np.uint8)
    assert C.CITYSCAPES_LUT_15[ids].tolist() == [[9, 10], [-1, -1]]
    assert C.CITYSCAPES_LUT_12[ids].tolist() == [[10, 11], [-1, -1]]


def test_protocols():
    p15, p12 = C.get_protocol(15), C.get_protocol(12)
    assert C.IGNORE == -1
    assert (p15.num_classes, p12.num_classes) == (15, 12)
    assert p15.class_names == ["road", "sidewalk", "building", "fence", "traffic light",
                               "traffic sign", "vegetation", "terrain", "sky", "person", "car",
                               "truck", "bus", "motorcycle", "bicycle"]
    assert p12.class_names == ["road", "sidewalk", "building", "fence", "pole",
                               "traffic light", "traffic sign", "vegetation", "sky", "person",
                               "rider", "car"]
    assert p15.eval_ids == list(range(15))
    assert p12.eval_ids == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]  # fence dropped
    assert p15.palette.dtype == np.uint8 and p15.palette.shape == (15, 3)
    assert p12.palette.shape == (12, 3)
    assert p15.palette[0].tolist() == [128, 64, 128]  # road
    assert p12.palette[10].tolist() == [255, 0, 0]  # rider
    assert p15.palette[14].tolist() == [119, 11, 32]  # bicycle
    with pytest.raises(ValueError, match="15"):
        C.get_protocol(19)
