"""The finiteness checks (sfc.train.guard, issue 18 item 2): read at once (--check-every 1) or
kept on the device with the bad update discarded (N > 1), against plain PyTorch SGD."""

import pytest
import torch
from torch import nn

from sfc.train.guard import FiniteGuard, NonFiniteLoss, resolve_every


def _pair(seed=0):
    """A tiny model and an identical twin, each with PyTorch's own SGD (the reference)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    twin = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    twin.load_state_dict(net.state_dict())
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9,  # noqa: E731
                                    weight_decay=5e-4, foreach=False)
    return net, opt(net), twin, opt(twin)


def _loss(net, x, nan=False):
    out = net(x).square().mean()
    return out * float("nan") if nan else out


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_deferred_guard_discards_the_bad_update_and_stays_on_the_last_good_state():
    net, opt, twin, topt = _pair()
    named = list(net.named_parameters())
    guard = FiniteGuard("cpu", every=5)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    # iteration 0: finite — the same update as PyTorch's SGD, bit for bit
    opt.zero_grad()
    topt.zero_grad()
    loss = guard.loss("x", _loss(net, x))
    loss.backward()
    _loss(twin, x).backward()
    assert guard.step(opt, named, 0) is None
    topt.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))
    good = _params(net)
    # iteration 1: a NaN loss — backward runs (NaN gradients), the update is discarded
    opt.zero_grad()
    guard.loss("x", _loss(net, x, nan=True)).backward()
    assert guard.step(opt, named, 1) is None  # nothing read yet
    assert all(torch.equal(a, b) for a, b in zip(good, net.parameters()))
    # iteration 2: finite again — still discarded (sticky): the state stays before iteration 2
    opt.zero_grad()
    guard.loss("x", _loss(net, x)).backward()
    guard.step(opt, named, 2)
    assert all(torch.equal(a, b) for a, b in zip(good, net.parameters()))
    assert guard.read() == (2, "loss", "x", 0)  # 1-based: the second iteration


def test_deferred_guard_keeps_its_state_in_place_and_takes_a_tensor_iteration():
    """What a captured step (--cuda-graph) relies on: the first-bad-iteration record is the
    same tensor storage from its creation on (a graph replays reads and writes of fixed
    addresses), and the iteration may be a 0-d device tensor filled before each step."""
    net, opt, _, _ = _pair(seed=3)
    named = list(net.named_parameters())
    guard = FiniteGuard("cpu", every=5)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    it = torch.zeros((), dtype=torch.int64)
    ptrs = set()
    for i, nan in enumerate((False, False, True, False)):
        it.fill_(i)
        opt.zero_grad()
        guard.loss("x", _loss(net, x, nan=nan)).backward()
        guard.step(opt, named, it)
        ptrs.add((guard.first_iter.data_ptr(), guard.first_code.data_ptr()))
    assert len(ptrs) == 1
    assert guard.read() == (3, "loss", "x", 0)


def test_deferred_guard_names_an_overflowing_parameter():
    net, opt, _, _ = _pair(seed=2)
    for g in opt.param_groups:
        g["lr"] = 3e38  # finite loss and gradients, an update that overflows to ±inf
    guard = FiniteGuard("cpu", every=3)
    before = _params(net)
    guard.loss("x", _loss(net, torch.randn(8, 4))).backward()
    guard.step(opt, list(net.named_parameters()), 0)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert guard.read() == (1, "parameter", "parameters", 0)


def test_checks_read_at_once_stop_before_the_backward_and_after_the_step():
    net, opt, _, _ = _pair()
    guard = FiniteGuard("cpu", every=1)
    with pytest.raises(NonFiniteLoss) as e:
        guard.loss("seg", _loss(net, torch.randn(2, 4), nan=True))
    assert e.value.term == "seg" and e.value.what == "loss"
    for g in opt.param_groups:
        g["lr"] = 3e38
    guard.loss("seg", _loss(net, torch.randn(8, 4))).backward()
    bad = guard.step(opt, list(net.named_parameters()), 0)
    assert bad in {n for n, _ in net.named_parameters()}
    assert guard.read() is None  # nothing deferred


def test_check_every_auto_and_bad_values():
    assert resolve_every("auto", torch.device("cpu")) == 1
    assert resolve_every("auto", torch.device("cuda")) == 50
    assert resolve_every("7", "cpu") == 7
    with pytest.raises(ValueError):
        resolve_every(0, "cpu")


@pytest.mark.parametrize("kind", ["segnet_sfc", "accel"])
def test_deferred_training_iteration_reads_nothing_on_the_host(kind):
    """The profiler's op names (independent of the guard): with --check-every 1 an iteration
    reads scalars on the host (the checks, the logged terms); with N > 1 none at all — on a GPU
    these reads are the syncs. (accel's flow check is read at once on the CPU on purpose; its
    loss and parameter checks are not.)"""
    from sfc.bench import measure, steps

    counts = {}
    for every in ("1", "8"):
        bc = steps.BenchConfig(source_size=(64, 32), target_size=(64, 32), layers=(1, 1, 1, 1),
                               width=8, check_every=every)
        stage = steps.build(kind, bc)
        src, tgt = steps.make_batches(kind, bc)
        steps.train_iteration(stage, src, tgt, 0)
        counts[every] = measure.profile_counts(
            lambda s=stage, a=src, b=tgt: steps.train_iteration(s, a, b, 1),
            torch.device("cpu"))["sync_ops"]
    flows = 1 if kind == "accel" else 0
    assert counts["8"] == flows
    assert counts["1"] >= counts["8"] + 2  # a loss term read twice (check, log) + parameters


def test_read_agrees_on_the_earliest_bad_iteration_of_any_rank(monkeypatch):
    """Several processes: each rank's (first bad iteration, term code) is gathered; all report
    the earliest iteration, then the lowest rank, with that rank's term."""
    from sfc import dist

    guard = FiniteGuard("cpu", every=4)
    guard._code("loss", "seg"), guard._code("flow", "accel.flownet")
    rows = [[-1, -1], [6, 1], [4, 0], [4, 1]]  # rank 0 clean; ranks 2 and 3 bad at index 4
    monkeypatch.setattr(dist, "gather_rows", lambda row: rows)
    assert guard.read() == (5, "loss", "seg", 2)
    rows[:] = [[-1, -1]] * 4
    assert guard.read() is None
