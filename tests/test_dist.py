"""Distributed helpers; sharded evaluation equals the single-process one exactly (gloo, CPU)."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from sfc import dist
from sfc.evaluate import evaluate_segnet, make_eval_loader
from sfc.models import DeepLabV2

C = 5


class TinyClips(Dataset):
    """7 in-memory items in the dataset item layout (seg/flow 3×T×H×W, label H×W, name)."""

    def __init__(self, n=7, h=24, w=40):
        g = torch.Generator().manual_seed(1)
        self.seg = torch.randn(n, 3, 2, h, w, generator=g) * 50
        self.label = torch.randint(-1, C, (n, h, w), generator=g)

    def __len__(self):
        return len(self.label)

    def __getitem__(self, i):
        return {"seg": self.seg[i], "flow": self.seg[i] / 255, "label": self.label[i],
                "name": f"img{i}"}


def tiny_segnet():
    torch.manual_seed(0)
    m = DeepLabV2(C, multi_level=True, layers=(1, 1, 1, 1), width=8)
    for mod in m.modules():  # non-trivial BN running stats, so eval mode matters
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def test_shard_sampler_covers_each_index_once():
    shards = [list(dist.ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]  # no padding, no repeats
    assert [len(dist.ShardSampler(7, rank=r, world_size=3)) for r in range(3)] == [3, 2, 2]
    assert list(dist.ShardSampler(TinyClips())) == list(range(7))  # single process: all
    with pytest.raises(ValueError):
        dist.ShardSampler(7, rank=2, world_size=2)


def test_single_process_helpers_are_noops(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = dist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.distributed) == (0, 1, 0, False)
    assert info.device == torch.device("cpu")
    assert dist.is_main() and dist.get_world_size() == 1
    t = torch.tensor([3, 4])
    assert dist.all_reduce_sum(t) is t and t.tolist() == [3, 4]
    dist.barrier()
    dist.cleanup()


def _worker(rank, world, store, out):
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        assert dist.is_dist() and dist.get_rank() == rank and dist.is_main() == (rank == 0)
        t = dist.all_reduce_sum(torch.tensor([rank + 1], dtype=torch.int64))
        assert t.item() == sum(range(1, world + 1))
        loader = make_eval_loader(TinyClips(), num_workers=0)
        res = evaluate_segnet(tiny_segnet(), loader, C, device="cpu", progress=False)
        torch.save({"cm": res["confusion"], "miou": res["miou"], "n": res["num_images"],
                    "shard": len(loader)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


def test_two_process_gloo_evaluation_equals_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    single = evaluate_segnet(tiny_segnet(), make_eval_loader(TinyClips(), num_workers=0), C,
                             progress=False)
    assert single["num_images"] == 7
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert [r["shard"] for r in results] == [4, 3]  # 7 images split, none repeated
    for r in results:
        assert r["n"] == 7
        assert torch.equal(r["cm"], single["confusion"])  # exact, integer sums
        assert r["miou"] == single["miou"]
    assert single["confusion"].sum().item() == int((TinyClips().label >= 0).sum())
    assert 0 < single["miou"] < 1 and np.isfinite(single["miou"])


class _BadItem(TinyClips):
    """Item 5 is an unreadable file; the shard sampler gives it to rank 1 (5 = 1 mod 2)."""

    def __getitem__(self, i):
        if i == 5:
            from sfc.data.io import DatasetError

            raise DatasetError("unreadable or truncated image /data/x_000005.png")
        return super().__getitem__(i)


def _bad_worker(rank, world, store, out):
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        loader = make_eval_loader(_BadItem(), num_workers=0)
        try:
            evaluate_segnet(tiny_segnet(), loader, C, device="cpu", progress=False)
            msg = None
        except Exception as e:  # noqa: BLE001 — the test records what each rank raised
            msg = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(str(msg))
    finally:
        tdist.destroy_process_group()


def test_a_data_error_on_one_rank_stops_every_rank_of_an_evaluation(tmp_path):
    """A file only rank 1 reads: rank 1 stops its loop, both ranks agree before the final
    all-reduce and raise the same DatasetError (no rank left waiting in the collective)."""
    mp.spawn(_bad_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert msgs[1] == "DatasetError: unreadable or truncated image /data/x_000005.png"
    assert msgs[0] == msgs[1] + " (on rank 1)"
