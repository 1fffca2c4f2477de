"""The release's defaults (issue 11, item 10): per-stage iterations, distinct data orders for
distinct seeds, the SFM's 460-frame VIPER val list; and every hyper-parameter of the seven
scripts against method §5."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from sfc import train
from sfc.data import viper
from sfc.train.streams import TrainStream

REPO = Path(__file__).resolve().parent.parent


def _resolved(*argv):
    return train.resolve(train.build_parser().parse_args(
        ["--out", "x", "--imagenet-init", "none", "--chairs-init", "none", "--update-ckpt", "u",
         "--reference-ckpt", "r", "--flownet-ckpt", "f", "--sfm-ckpt", "s", *argv]))


@pytest.mark.parametrize("stage,weight,iters,every,order", [
    ("segnet", "0", 80000, 2000, "after"), ("segnet", "0.005", 120000, 2000, "before"),
    ("accel", "0", 80000, 2000, "after"), ("accel", "0.001", 160000, 2000, "before"),
    ("sfm", "0", 80000, 4000, "after")])
def test_per_stage_defaults_are_the_releases(stage, weight, iters, every, order):
    cfg = _resolved("--stage", stage, "--sfc-weight", weight)
    assert (cfg.iters, cfg.eval_every) == (iters, every)
    if stage == "accel":
        assert cfg.warmup_order == order
    assert _resolved("--stage", stage, "--sfc-weight", weight, "--iters", "7").iters == 7


class _Len:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_seeds_and_streams_share_no_order():
    n, epochs = 40, 6
    orders = {}
    for seed in (0, 1):
        for stream in (0, 1):
            s = TrainStream(_Len(n), seed=seed, stream=stream)
            orders[seed, stream] = [tuple(s.order(e)) for e in range(epochs)]
            assert all(sorted(o) == list(range(n)) for o in orders[seed, stream])
    every = [o for v in orders.values() for o in v]
    assert len(set(every)) == len(every)  # 24 orders, all different
    # the old rule (seed + epoch) made seed 1, epoch 0 the order of seed 0, epoch 1
    assert orders[1, 0][0] != orders[0, 0][1]


def test_shards_cover_each_epoch_once():
    full = TrainStream(_Len(11), seed=3).order(0)
    shards = [TrainStream(_Len(11), seed=3, rank=r, world_size=4)._indices(0) for r in range(4)]
    assert all(len(s) == 3 for s in shards)  # padded to 12 by repetition, as DistributedSampler
    assert sorted(i for s in shards for i in s) == sorted(full + full[:1])
    assert [s[0] for s in shards] == full[:4]


def test_shipped_viper_val_list_is_the_releases():
    lines = viper.RELEASE_VAL_LIST.read_text().split("\n")
    assert len(lines) == 460 and lines[-1]  # the last entry has no trailing newline
    entries = [viper.parse_viper_entry(x) for x in lines]
    assert len(set(entries)) == 459  # one entry is listed twice
    assert len({s for s, _ in entries}) == 46 and all(f % 10 == 0 for _, f in entries)
    assert lines[:2] == ["006/006_00110.jpg", "006/006_00190.jpg"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    from sfc.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, seed=0, tiny=True, datasets=("viper", "cityscapes"))
    return root


def _sfm_cfg(root, *extra):
    return train.resolve(train.build_parser().parse_args(
        ["--stage", "sfm", "--data", str(root), "--out", "x", "--flownet-ckpt", "f",
         "--source-size", "64", "32", *extra]))


def test_sfm_val_falls_back_to_all_val_frames_on_a_synthetic_tree(tree):
    data = train.build_data(_sfm_cfg(tree))
    assert len(data.val) == len(viper.ViperSeq(tree / "VIPER", split="val", size=None))
    assert "not under" in data.notes[0] and "all annotated val frames" in data.notes[0]


def test_sfm_val_uses_the_release_list_when_its_frames_exist(tree, tmp_path, monkeypatch):
    have = viper.ViperSeq(tree / "VIPER", split="val", size=None).items
    lst = tmp_path / "val.txt"
    picks = [have[0], have[-1], have[0]]  # a list with a duplicate, as the release's
    lst.write_text("\n".join(f"{s}/{s}_{f:05d}.jpg" for s, f in picks))
    monkeypatch.setattr(viper, "RELEASE_VAL_LIST", lst)
    data = train.build_data(_sfm_cfg(tree))
    assert data.val.items == picks
    assert "the release's VIPER val list" in data.notes[0]
    (tree / "VIPER" / "val" / "img" / picks[1][0] / f"{picks[1][0]}_{picks[1][1]:05d}.jpg"
     ).rename(tmp_path / "moved.jpg")  # one frame missing: fall back
    try:
        assert "not under" in train.build_data(_sfm_cfg(tree)).notes[0]
        own = tmp_path / "own.txt"
        own.write_text(f"{picks[0][0]}/{picks[0][0]}_{picks[0][1]:05d}.jpg\n")
        data = train.build_data(_sfm_cfg(tree, "--val-list", str(own)))  # overrides both
        assert data.val.items == picks[:1] and "--val-list" in data.notes[0]
    finally:
        (tmp_path / "moved.jpg").rename(
            tree / "VIPER" / "val" / "img" / picks[1][0] / f"{picks[1][0]}_{picks[1][1]:05d}.jpg")


# ---- every hyper-parameter of the seven scripts (method §5) --------------------------------
COMMON = {"--momentum": "0.9", "--batch-size": "1"}
SEGNET = {**COMMON, "--stage": "segnet", "--lr": "2.5e-4", "--weight-decay": "5e-4",
          "--optimizer": "release", "--eval-every": "2000"}
ACCEL = {**COMMON, "--stage": "accel", "--lr": "5e-4", "--warmup-lr": "5e-5",
         "--warmup-iters": "1000", "--weight-decay": "5e-4", "--eval-every": "2000"}
EXPECTED = {
    "FlowNet_pretrain/stage_one/script/update.sh":
        {**SEGNET, "--seed": "0", "--iters": "80000", "--sfc-weight": "0"},
    "FlowNet_pretrain/stage_one/script/reference.sh":
        {**SEGNET, "--seed": "1", "--iters": "80000", "--sfc-weight": "0"},
    "FlowNet_pretrain/stage_two/script/train.sh":
        {**ACCEL, "--seed": "0", "--iters": "80000", "--warmup-order": "after",
         "--sfc-weight": "0"},
    "SFM/script/train.sh":
        {"--stage": "sfm", "--seed": "0", "--iters": "80000", "--eval-every": "4000",
         "--lr": "1e-4", "--weight-decay": "4e-4", "--batch-size": "1"},
    "SFC/stage_one/script/update.sh":
        {**SEGNET, "--seed": "0", "--iters": "120000", "--sfc-weight": "0.005",
         "--scale": "100"},
    "SFC/stage_one/script/reference.sh":
        {**SEGNET, "--seed": "1", "--iters": "120000", "--sfc-weight": "0.005",
         "--scale": "100"},
    "SFC/stage_two/script/train.sh":
        {**ACCEL, "--seed": "0", "--iters": "160000", "--warmup-order": "before",
         "--sfc-weight": "0.001", "--scale": "100"},
}
FLAGS_WITH_VALUES = set().union(*EXPECTED.values()) | {
    "--imagenet-init", "--chairs-init", "--update-ckpt", "--reference-ckpt", "--flownet-ckpt",
    "--sfm-ckpt", "--source", "--data", "--out"}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_script_hyper_parameters_are_spec_section_5(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LAUNCH", "SOURCE")}
    env.update(DRY_RUN="1", SFC_OUT=str(tmp_path), SFC_DATA=str(tmp_path),
               SFC_WEIGHTS=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "exp" / script)], capture_output=True, text=True,
                          env=env, timeout=60)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ ")][0]
    cmd = shlex.split(line[2:])[3:]  # after PYTHON -m sfc.train
    given = {}
    for i, a in enumerate(cmd):
        if a.startswith("--"):
            assert a in FLAGS_WITH_VALUES, f"{script} passes an unchecked flag {a}"
            assert a not in given, f"{script} passes {a} twice"
            given[a] = cmd[i + 1]
    assert {k: given.get(k) for k in EXPECTED[script]} == EXPECTED[script]
    # and sfc.train resolves them to the same numbers (nothing is left to a default)
    args = train.build_parser().parse_args(cmd)
    for flag, want in EXPECTED[script].items():
        got = getattr(args, flag[2:].replace("-", "_"))
        assert (float(got) == float(want)) if isinstance(got, (int, float)) else got == want
