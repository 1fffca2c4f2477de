"""The validation cache (`--val-cache-gb`): later evaluations take the first complete pass's
batches from memory — the same tensors as the files give (against the datasets' float path,
an independent reading), the same evaluation results, and nothing kept from a pass cut short
or past the limit."""

import json

import pytest
import torch
from conftest import TINY_TRAIN
from torch.utils.data import DataLoader, Dataset

from sfc.data import make_dataset
from sfc.data.io import DatasetError
from sfc.train.valcache import CachedLoader


class Counting(Dataset):
    """A dataset that counts its reads (and can fail on one index)."""

    def __init__(self, ds, fail_at=None):
        self.ds, self.reads, self.fail_at = ds, 0, fail_at

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.reads += 1
        if i == self.fail_at:
            raise DatasetError(f"clip {i}: unreadable")
        return self.ds[i]


def _val(root, raw):
    return make_dataset("cityscapes", root, split="val", frames=2, size=(64, 32), raw=raw)


def test_second_pass_reads_no_files_and_equals_the_float_path(tiny_data):
    raw = Counting(_val(tiny_data, raw=True))
    flt = _val(tiny_data, raw=False)  # the datasets' own float reading: the reference
    logs = []
    cl = CachedLoader(DataLoader(raw, batch_size=1), "cpu", 1.0, log=logs.append)
    assert len(cl) == len(flt) >= 2
    first = list(cl)
    assert raw.reads == len(flt) and cl.items is not None
    one = 3 * 2 * 32 * 64 + 32 * 64  # a clip's bytes: uint8 BGR, 2 frames; int8 label
    assert cl.nbytes == len(flt) * one
    assert logs == [f"validation cache: {len(flt)} batches, {len(flt) * one / 2**20:.1f} MiB "
                    "in memory; later evaluations read no files"]
    second = list(cl)
    assert raw.reads == len(flt)  # no file read again
    for i, (a, b) in enumerate(zip(first, second)):
        want = next(iter(DataLoader(torch.utils.data.Subset(flt, [i]), batch_size=1)))
        assert sorted(b) == sorted(want) == sorted(a)
        for k, v in want.items():
            if torch.is_tensor(v):
                assert b[k].dtype == v.dtype and torch.equal(b[k], v), k
                assert torch.equal(a[k], v), k
            else:
                assert b[k] == v == a[k]
    labels = torch.cat([b["label"].flatten() for b in second])
    assert labels.dtype == torch.int64 and (labels == -1).any()  # the ignore id kept
    kept = cl.items[0]["label"]
    assert isinstance(kept, tuple) and kept[0].dtype == torch.int8  # one byte per label
    assert cl.items[0]["bgr"].dtype == torch.uint8


def test_a_pass_cut_short_keeps_nothing(tiny_data):
    raw = Counting(_val(tiny_data, raw=True))
    cl = CachedLoader(DataLoader(raw, batch_size=1), "cpu", 1.0, log=lambda s: None)
    for _ in zip(range(1), cl):  # the consumer stops after one batch
        pass
    assert cl.items is None
    failing = Counting(_val(tiny_data, raw=True), fail_at=1)
    cl2 = CachedLoader(DataLoader(failing, batch_size=1), "cpu", 1.0, log=lambda s: None)
    with pytest.raises(DatasetError, match="clip 1: unreadable"):
        list(cl2)
    assert cl2.items is None
    list(cl)  # a complete pass now
    assert cl.items is not None and len(cl.items) == len(raw)


def test_over_the_limit_or_off_reads_the_files_every_time(tiny_data):
    raw = Counting(_val(tiny_data, raw=True))
    logs = []
    cl = CachedLoader(DataLoader(raw, batch_size=1), "cpu", 1e-9, log=logs.append)
    list(cl)
    list(cl)
    assert cl.items is None and raw.reads == 2 * len(raw)
    assert len(logs) == 1 and "given up" in logs[0] and "--val-cache-gb 1e-09" in logs[0]
    off = Counting(_val(tiny_data, raw=True))
    logs.clear()
    cl = CachedLoader(DataLoader(off, batch_size=1), "cpu", 0, log=logs.append)
    list(cl)
    list(cl)
    assert cl.items is None and off.reads == 2 * len(off) and logs == []


@pytest.mark.parametrize("kind", ["segnet", "sfm"])
def test_engine_results_equal_with_and_without_the_cache(kind, tiny_data, tiny_runs, tmp_path):
    """Three evaluations per run: with the cache the second and third read memory; every
    evaluation's metrics and the final weights equal those of a run without it."""
    from conftest import stage_kind_flags

    from sfc import train

    def run(name, *extra):
        out = tmp_path / name
        args = ["--data", str(tiny_data), "--out", str(out), *TINY_TRAIN,
                *stage_kind_flags(kind, tiny_runs), "--iters", "3", "--eval-every", "1",
                *extra]
        assert train.main(args) == 0
        vals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r.get("split") == "val"]
        return out, vals

    on, v_on = run("on")
    off, v_off = run("off", "--val-cache-gb", "0")
    assert len(v_on) == 3 and v_on == v_off
    log = (on / "log.txt").read_text()
    assert log.count("validation cache: 2 batches") == 1  # the tiny val set: 2 clips
    assert "validation cache" not in (off / "log.txt").read_text()
    a = torch.load(on / "last.pt", map_location="cpu", weights_only=False)["models"]
    b = torch.load(off / "last.pt", map_location="cpu", weights_only=False)["models"]
    for net in a:
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), (net, k)
