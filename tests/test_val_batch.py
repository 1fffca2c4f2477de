"""`--val-batch-size` (issue 18): validation in batches of several clips. Eval mode uses the
BatchNorm running statistics, so a batch gives each clip the prediction it gets alone: the
confusion matrices of batch 1 and of batches of 3 (the last one short, a `limit` inside a
batch too) are equal for the SegNet and Accel evaluations, and an engine run with batched
validation has every evaluation's metrics and the final weights of the run without it."""

import json

import pytest
import torch
from conftest import TINY_TRAIN, stage_kind_flags
from torch.utils.data import DataLoader

from sfc.bench import steps
from sfc.evaluate.core import evaluate_accel, evaluate_segnet
from sfc.models import Accel, DeepLabV2


def _items(n):
    bc = steps.BenchConfig(source_size=(64, 48), target_size=(64, 48))
    return steps.make_val_items("segnet", bc, n, seed=4)


def _trained_bn(net):
    """Running statistics other than the init's (0 / 1), so eval mode really uses them."""
    g = torch.Generator().manual_seed(2)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


@pytest.mark.parametrize("limit", [None, 5])
def test_batched_segnet_and_accel_evaluation_equal_batch_one(limit):
    torch.manual_seed(0)
    seg = _trained_bn(DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8))
    accel = Accel(15, layers=(1, 1, 1, 1), width=8)
    _trained_bn(accel.net_ref), _trained_bn(accel.net_update)
    items = _items(7)
    for evaluate, model in ((evaluate_segnet, seg), (evaluate_accel, accel)):
        res = [evaluate(model, DataLoader(items, batch_size=b), 15, progress=False, limit=limit)
               for b in (1, 3)]
        assert res[0]["num_images"] == res[1]["num_images"] == (limit or 7)
        assert res[0]["confusion"].sum() > 0
        assert torch.equal(res[0]["confusion"], res[1]["confusion"]), evaluate.__name__
        assert res[0]["miou"] == res[1]["miou"]


@pytest.mark.parametrize("kind", ["segnet", "accel", "sfm"])
def test_engine_validation_in_batches_equals_batch_one(kind, tiny_data, tiny_runs, tmp_path):
    from sfc import train

    def run(name, *extra):
        out = tmp_path / name
        assert train.main(["--data", str(tiny_data), "--out", str(out), *TINY_TRAIN,
                           *stage_kind_flags(kind, tiny_runs), "--iters", "2",
                           "--eval-every", "1", *extra]) == 0
        vals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if r.get("split") == "val"]
        return out, vals

    two, v_two = run("two", "--val-batch-size", "2")
    one, v_one = run("one")
    assert len(v_two) == 2 and v_two == v_one
    assert "validation cache: 1 batch," in (two / "log.txt").read_text()  # 2 clips, 1 batch
    a = torch.load(two / "last.pt", map_location="cpu", weights_only=False)["models"]
    b = torch.load(one / "last.pt", map_location="cpu", weights_only=False)["models"]
    for net in a:
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), (net, k)


def test_val_batch_size_must_be_positive(tmp_path, capsys):
    from sfc import train

    assert train.main(["--stage", "segnet", "--out", str(tmp_path / "r"),
                       "--val-batch-size", "0"]) == 2
    assert "--val-batch-size" in capsys.readouterr().err


# ---- --num-workers auto ----------------------------------------------------------------------
def test_num_workers_auto_by_hand(monkeypatch):
    """auto: 4 on the CPU (at most the usable CPUs); on CUDA (usable CPUs / processes on the
    node − 1) / loaders, in [1, 8]; a number is taken as given; anything else is a flag error
    naming the flag."""
    from sfc.flags import FlagError
    from sfc.train.cli import resolve_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SFC_JOBS_PER_NODE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", "cpu", True) == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert resolve_workers("auto", "cpu", True) == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert resolve_workers("auto", "cuda", True) == 7  # (16 − 1) // 2
    assert resolve_workers("auto", "cuda:0", False) == 8  # 15, at most 8
    monkeypatch.setenv("SFC_JOBS_PER_NODE", "2")
    assert resolve_workers("auto", "cuda", True) == 3  # (8 − 1) // 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_workers("auto", "cuda", True) == 1  # (1 − 1) // 2, at least 1
    assert resolve_workers("6", "cuda", True) == 6 and resolve_workers(0, "cpu", True) == 0
    monkeypatch.setenv("SFC_JOBS_PER_NODE", "two")
    with pytest.raises(FlagError, match="SFC_JOBS_PER_NODE='two' is not a number"):
        resolve_workers("auto", "cuda", True)
    for bad in ("x", "-1", "2.5"):
        with pytest.raises(FlagError, match=f"--num-workers {bad}: expected a number >= 0 "
                                            "or auto"):
            resolve_workers(bad, "cpu", True)


def test_the_log_and_config_say_how_many_workers(tiny_data, tmp_path, monkeypatch):
    from sfc import train

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})

    out = tmp_path / "r"
    args = [a for a in TINY_TRAIN]
    args[args.index("--num-workers") + 1] = "auto"
    assert train.main(["--stage", "segnet", "--imagenet-init", "none", "--data",
                       str(tiny_data), "--out", str(out), *args, "--device", "cpu",
                       "--iters", "1", "--eval-every", "1"]) == 0
    assert "data loaders: 3 workers per loader (1 training loader)" in (
        out / "log.txt").read_text()
    assert json.loads((out / "config.json").read_text())["config"]["num_workers"] == 3
