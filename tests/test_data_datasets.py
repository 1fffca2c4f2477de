"""Datasets on tiny generated trees: shapes, normalisations, clip order, label processing."""

import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sfc.data import (
    DATASET_DIRS,
    CityscapesSeq,
    SynthiaSeq,
    ViperSeq,
    make_dataset,
)
from sfc.data.io import remove_ego_vehicle
from sfc.data.synthetic import generate

MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(root, seed=0, tiny=True)
    return root


@pytest.fixture
def own_tree(tree, tmp_path):
    """A private copy that a test may modify."""
    shutil.copytree(tree, tmp_path / "d")
    return tmp_path / "d"


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_shapes_all_datasets(tree, frames):
    cases = [("viper", dict(size=(48, 32), prev_label=True), (32, 48)),
             ("cityscapes", dict(size=(48, 24), split="train"), (24, 48)),
             ("synthia_seq", dict(size=(40, 20), prev_label=True), (20, 40))]
    for name, kw, (h, w) in cases:
        ds = make_dataset(name, tree, frames=frames, **kw)
        it = ds[0]
        assert it["seg"].shape == (3, frames, h, w) and it["seg"].dtype == torch.float32
        assert it["flow"].shape == (3, frames, h, w) and it["flow"].dtype == torch.float32
        assert it["label"].shape == (h, w) and it["label"].dtype == torch.int64
        assert isinstance(it["name"], str)
        if kw.get("prev_label"):
            assert it["label_prev"].shape == (h, w) and it["label_prev"].dtype == torch.int64
            assert it["label_down4x"].shape == ((h + 3) // 4, (w + 3) // 4)


def test_lengths_and_names(tree):
    v = ViperSeq(tree / "VIPER", size=None)
    assert [v.items[i] for i in range(len(v))] == [("001", 10), ("001", 20), ("002", 10),
                                                   ("002", 20)]
    assert v[0]["name"] == "001_00010"
    # frames=11 needs f-10 >= 0: frame 10 (0..10) still fits, nothing more
    assert len(ViperSeq(tree / "VIPER", frames=11, size=None)) == 4
    assert len(ViperSeq(tree / "VIPER", frames=12, size=None)) == 2
    cs = CityscapesSeq(tree / "Cityscapes", split="val", size=None)
    assert len(cs) == 2 and cs[0]["name"].endswith("_000019")
    s = SynthiaSeq(tree / "SynthiaSeq/SEQS-04-DAWN", size=None)
    assert [s.items[0], s.items[-1], len(s)] == [1, 11, 11]  # 000001.. (needs a predecessor)
    assert DATASET_DIRS == {"viper": "VIPER", "cityscapes": "Cityscapes",
                            "synthia_seq": "SynthiaSeq/SEQS-04-DAWN"}


def test_normalisation_and_clip_order(tree):
    ds = ViperSeq(tree / "VIPER", frames=3, size=None)
    it = ds[0]  # 001_00010: frames 8, 9, 10
    for k, f in enumerate((8, 9, 10)):
        rgb = np.asarray(Image.open(tree / f"VIPER/train/img/001/001_{f:05d}.jpg").convert("RGB"))
        y, x = 20, 33
        r, g, b = rgb[y, x].astype(np.float64)
        seg = it["seg"][:, k, y, x].double().numpy()
        flow = it["flow"][:, k, y, x].double().numpy()
        np.testing.assert_allclose(seg, [b - MEAN_BGR[0], g - MEAN_BGR[1], r - MEAN_BGR[2]],
                                   atol=1e-4)
        np.testing.assert_allclose(flow, [b / 255, g / 255, r / 255], atol=1e-6)
        full = torch.from_numpy(rgb[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255
        assert torch.allclose(it["flow"][:, k], full, atol=1e-6)
    assert not torch.equal(it["seg"][:, 0], it["seg"][:, 2])  # the frames do move


def test_resize_filters_bicubic_nearest(tree):
    ds = CityscapesSeq(tree / "Cityscapes", split="val", size=(40, 20))
    it = ds[0]
    city, seq, f = ds.items[0]
    img = Image.open(ds.image_path(city, seq, f)).convert("RGB").resize((40, 20), Image.BICUBIC)
    ref = np.asarray(img)[:, :, ::-1].astype(np.float32) / 255
    np.testing.assert_allclose(it["flow"][:, -1].numpy().transpose(1, 2, 0), ref, atol=1e-6)
    ids = Image.open(ds.label_path(city, seq, f)).resize((40, 20), Image.NEAREST)
    from sfc.data.classes import CITYSCAPES_LUT_15
    assert it["label"].numpy().tolist() == CITYSCAPES_LUT_15[np.asarray(ids)].tolist()


def test_ego_vehicle_removal_function():
    ids = np.full((12, 16), 3, np.uint8)
    ids[9:, 5:11] = 24         # ego blob under the bottom-centre pixel (11, 8)
    ids[8, 4] = 24             # touches the blob only diagonally: same 8-connected component
    ids[2:4, 1:4] = 24         # another car: kept
    out = remove_ego_vehicle(ids)
    assert (out[9:, 5:11] == 0).all() and out[8, 4] == 0
    assert (out[2:4, 1:4] == 24).all()
    assert (out[ids == 3] == 3).all()
    ids2 = ids.copy()
    ids2[11, 8] = 3  # bottom-centre not a car: nothing removed
    assert np.array_equal(remove_ego_vehicle(ids2), ids2)


def test_ego_vehicle_removed_in_items(own_tree):
    path = own_tree / "VIPER/train/cls/001/001_00010.png"
    ids = np.full((54, 96), 3, np.uint8)
    ids[40:, 30:66] = 24   # ego car at the bottom centre
    ids[5:15, 5:20] = 24   # another car
    ids[20:25, 70:80] = 25  # van (not in the 15 classes)
    lab = Image.fromarray(ids)
    lab.putpalette(list(range(256)) * 3)
    lab.save(path)
    it = ViperSeq(own_tree / "VIPER", size=None, prev_label=True)[0]
    label = it["label"].numpy()
    assert (label[40:, 30:66] == -1).all()
    assert (label[5:15, 5:20] == 10).all()
    assert (label[20:25, 70:80] == -1).all()
    assert (label[ids == 3] == 0).all()
    # label_down4x: NEAREST to 96x54 (identity) then to 24x14, ego removed at 1/4
    small = np.asarray(Image.fromarray(ids).resize((24, 14), Image.NEAREST))
    assert it["label_down4x"].numpy().tolist() == np.where(
        small == 24, np.where(np.arange(14)[:, None] >= 10, -1, 10),
        np.where(small == 3, 0, -1)).tolist()


def test_vegetation_ids_and_rider(own_tree):
    path = own_tree / "VIPER/train/cls/001/001_00010.png"
    ids = np.zeros((54, 96), np.uint8)
    ids[:, :48], ids[:, 48:] = 7, 8
    Image.fromarray(ids).save(path)  # mode 'L' is accepted too
    assert (ViperSeq(own_tree / "VIPER", size=None)[0]["label"] == 6).all()
    cs = CityscapesSeq(own_tree / "Cityscapes", split="val", size=None)
    city, seq, f = cs.items[0]
    Image.fromarray(np.full((48, 96), 25, np.uint8)).save(cs.label_path(city, seq, f))
    assert (cs[0]["label"] == 9).all()  # rider -> person (15 classes)
    cs12 = CityscapesSeq(own_tree / "Cityscapes", split="val", size=None, classes=12)
    assert (cs12[0]["label"] == 10).all()  # rider (12 classes)


def test_synthia_crop_and_16bit(own_tree):
    root = own_tree / "SynthiaSeq/SEQS-04-DAWN"
    lab = root / "GT/LABELS/Stereo_Left/Omni_F/000005.png"
    r = np.zeros((38, 64), np.uint16)
    r[:32] = 11     # bicycle -> "rider" (10)
    r[32:] = 3      # road, in the cropped bottom round(38*120/760) = 6 rows
    junk = np.full_like(r, 700)  # instance-like values in B and G
    cv2.imwrite(str(lab), np.dstack([junk, junk + 1, r]))  # BGR: class in R = index 2
    ds = SynthiaSeq(root, size=None)
    it = ds[ds.items.index(5)]
    assert it["label"].shape == (32, 64) and (it["label"] == 10).all()
    assert it["seg"].shape == (3, 2, 32, 64)
    rgb = np.asarray(Image.open(root / "RGB/Stereo_Left/Omni_F/000005.png").convert("RGB"))
    np.testing.assert_allclose(it["flow"][:, 1].numpy().transpose(1, 2, 0),
                               rgb[:32, :, ::-1] / 255.0, atol=1e-6)


def test_synthia_layouts_and_splits(tmp_path):
    generate(tmp_path / "flat", seed=0, tiny=True, datasets=["synthia_seq"], synthia_layout="flat")
    generate(tmp_path / "orig", seed=0, tiny=True, datasets=["synthia_seq"])
    flat = SynthiaSeq(tmp_path / "flat/SynthiaSeq/SEQS-04-DAWN", size=None)
    orig = SynthiaSeq(tmp_path / "orig/SynthiaSeq/SEQS-04-DAWN", size=None)
    assert (tmp_path / "flat/SynthiaSeq/SEQS-04-DAWN/rgb/000000.png").is_file()
    assert flat.items == orig.items
    a, b = flat[3], orig[3]
    assert torch.equal(a["seg"], b["seg"]) and torch.equal(a["label"], b["label"])
    root = tmp_path / "orig/SynthiaSeq/SEQS-04-DAWN"
    assert SynthiaSeq(root, split="val", val_frames=3).items == [9, 10, 11]
    assert SynthiaSeq(root, val_frames=3, holdout_val=True).items == list(range(1, 9))
    assert len(SynthiaSeq(root, val_frames=3)) == 11  # default: all frames (DA-VSN)


def test_list_files(tree, tmp_path):
    (tmp_path / "v.txt").write_text("002/002_00020.jpg\n001/001_00010.jpg\n")
    assert ViperSeq(tree / "VIPER", list_file=tmp_path / "v.txt").items == [("002", 20),
                                                                             ("001", 10)]
    cs = CityscapesSeq(tree / "Cityscapes", split="val", size=None)
    city, seq, f = cs.items[1]
    (tmp_path / "c.txt").write_text(f"val_{city}_{seq}_{f:06d}\n"
                                    f"{city}/{city}_{seq}_{f:06d}_leftImg8bit.png\n")
    cl = CityscapesSeq(tree / "Cityscapes", split="val", list_file=tmp_path / "c.txt", size=None)
    assert cl.items == [(city, seq, f)] * 2
    (tmp_path / "s.txt").write_text("000004\n000007.png\n")
    s = SynthiaSeq(tree / "SynthiaSeq/SEQS-04-DAWN", list_file=tmp_path / "s.txt")
    assert s.items == [4, 7]


def test_determinism(tmp_path):
    files = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate(tmp_path / name, seed=seed, tiny=True)
        files[name] = {p.relative_to(tmp_path / name): p.read_bytes()
                       for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}
    # VIPER (3 sequences × 21 frames × image + label, and the flow of every frame but each
    # sequence's last), Cityscapes (3 train snippets of 3 frames, 2 val snippets of 30 frames as
    # the real ones, 5 labels, the flow of every frame but each snippet's last), SYNTHIA
    # (12 × image + label)
    assert len(files["a"]) == (3 * 21 * 2 + 3 * 20) + (3 * 3 + 2 * 30 + 5 + 3 * 2 + 2 * 29) \
        + 12 * 2
    val = sorted(p.name for p in files["a"] if "leftImg8bit_sequence/val" in str(p))
    assert len(val) == 60 and val[0].endswith("_000000_leftImg8bit.png")
    assert sum(n.endswith("_000029_leftImg8bit.png") for n in val) == 2
    assert files["a"] == files["b"]
    assert files["a"].keys() == files["c"].keys() and files["a"] != files["c"]


def test_native_sizes_and_resize_path(tmp_path):
    # two frames each of VIPER and SYNTHIA at their native sizes (Cityscapes' resize path is
    # the same code, tested at small sizes above)
    generate(tmp_path, seed=0, native=True, datasets=["viper", "synthia_seq"], viper_seqs=1,
             viper_val_seqs=0, frames_per_seq=2, viper_first_frame=9, synthia_frames=2)
    img = Image.open(tmp_path / "VIPER/train/img/001/001_00010.jpg")
    assert img.size == (1920, 1080) and img.format == "JPEG"
    lab = Image.open(tmp_path / "VIPER/train/cls/001/001_00010.png")
    assert lab.mode == "P" and lab.size == (1920, 1080)
    it = ViperSeq(tmp_path / "VIPER", size=(128, 72), prev_label=True)[0]
    ref = np.asarray(img.convert("RGB").resize((128, 72), Image.BICUBIC))
    np.testing.assert_allclose(it["flow"][:, 1].numpy().transpose(1, 2, 0),
                               ref[:, :, ::-1] / 255.0, atol=1e-6)
    mid = np.asarray(lab.resize((128, 72), Image.NEAREST))
    assert it["label_down4x"].shape == (18, 32)
    quarter = remove_ego_vehicle(np.asarray(Image.fromarray(mid).resize((32, 18), Image.NEAREST)))
    from sfc.data.classes import VIPER_LUT_15
    assert it["label_down4x"].numpy().tolist() == VIPER_LUT_15[quarter].tolist()
    assert it["label"][-1, 64] == -1  # the ego hood is ignored
    root = tmp_path / "SynthiaSeq/SEQS-04-DAWN"
    raw = cv2.imread(str(root / "GT/LABELS/Stereo_Left/Omni_F/000001.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and raw.shape == (760, 1280, 3) and raw[:, :, 0].min() > 0
    s = SynthiaSeq(root, size=None)[0]
    assert s["label"].shape == (640, 1280) and s["seg"].shape == (3, 2, 640, 1280)


@pytest.mark.parametrize("name,kw", [
    ("viper", dict(size=(48, 32), prev_label=True, frames=2)),
    ("cityscapes", dict(size=(48, 24), split="train", frames=3)),
    ("synthia_seq", dict(size=(40, 20), prev_label=True, frames=2)),
])
def test_raw_items_normalise_to_the_float_items_exactly(tree, name, kw):
    """raw=True (training): "bgr" uint8, which normalise_batch turns into the float path's
    "seg"/"flow" bit for bit; every other entry is unchanged."""
    from sfc.data.io import normalise_batch

    ref = make_dataset(name, tree, **kw)
    raw = make_dataset(name, tree, raw=True, **kw)
    assert "raw" in repr(raw)
    for i in (0, len(ref) - 1):
        a, b = ref[i], raw[i]
        assert "seg" not in b and b["bgr"].dtype == torch.uint8
        assert b["bgr"].shape == a["seg"].shape
        n = normalise_batch(b)
        assert set(n) == set(a)
        for k, v in a.items():
            assert torch.equal(n[k], v) if torch.is_tensor(v) else n[k] == v, k
    # batched (B, 3, T, H, W), as the engine's streams deliver them
    batch = torch.utils.data.default_collate([raw[0], raw[1]])
    full = torch.utils.data.default_collate([ref[0], ref[1]])
    n = normalise_batch(batch)
    assert torch.equal(n["seg"], full["seg"]) and torch.equal(n["flow"], full["flow"])


def test_normalise_bgr_tables_cover_every_byte():
    """Every byte value in every channel: the table equals the float path's operation."""
    from sfc.data.io import clip_arrays, clip_bgr, normalise_bgr

    v = np.arange(256, dtype=np.uint8)
    frames = [np.stack([v, np.roll(v, 7), np.roll(v, 100)], axis=1)[None].repeat(2, 0),
              np.stack([v[::-1], v, np.roll(v, 3)], axis=1)[None].repeat(2, 0)]  # (2, 256, 3)
    seg, flow = clip_arrays(frames)
    s, f = normalise_bgr(torch.from_numpy(clip_bgr(frames)))
    assert torch.equal(s, torch.from_numpy(seg)) and torch.equal(f, torch.from_numpy(flow))
    with pytest.raises(ValueError, match="uint8"):
        normalise_bgr(torch.zeros(3, 2, 4, 4))


def test_streams_to_device_normalises_raw_batches(tree):
    from sfc.train.streams import to_device

    raw = make_dataset("viper", tree, size=(48, 32), raw=True)
    ref = make_dataset("viper", tree, size=(48, 32))
    batch = to_device(torch.utils.data.default_collate([raw[0]]), torch.device("cpu"))
    assert "bgr" not in batch
    assert torch.equal(batch["seg"][0], ref[0]["seg"])
    assert torch.equal(batch["flow"][0], ref[0]["flow"])
