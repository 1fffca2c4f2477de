"""`--stack-forwards` (sfc.models.stacked, issue 18): k forwards of one network stacked along
the batch, each with its own BatchNorm statistics, equal k forwards one after the other —
outputs, the gradients of input, weight and bias, the running statistics (whose order
matters: the inputs here have other statistics, so the reversed order fails) and
`num_batches_tracked` — checked against PyTorch's own `nn.BatchNorm2d` called k times, in
float64 to 1e-12; through a whole DeepLab-v2 and Accel; and the SFC stages' training
iterations with and without the switch within float32 rounding, eager and under the emulated
CUDA graph."""

import copy
import json

import pytest
import torch
from torch import nn

from sfc.models import Accel, DeepLabV2
from sfc.models.stacked import (
    StackableBatchNorm2d,
    chunked_batch_norm,
    split_stacked,
    stacked,
    stacked_chunks,
)

F64 = {"rtol": 1e-12, "atol": 1e-12}


def _inputs(k, b, c=5, h=6, w=7, seed=0):
    """k chunks of b samples, each chunk with its own mean and spread."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, dtype=torch.float64, generator=g) * (1 + j) + 3 * j
            for j in range(k)]


def _bn(c=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return bn


def _run(bn, xs, stack):
    """Forward (stacked or one chunk after the other) and backward of a fixed random
    projection: (outputs, input grads, weight grad, bias grad)."""
    xs = [x.clone().requires_grad_() for x in xs]
    if stack:
        ys = list(chunked_batch_norm(bn, torch.cat(xs), len(xs)).chunk(len(xs)))
    else:
        ys = [bn(x) for x in xs]
    g = torch.Generator().manual_seed(7)
    sum((y * torch.randn(y.shape, dtype=y.dtype, generator=g)).sum() for y in ys).backward()
    return ys, [x.grad for x in xs], bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("k,b", [(2, 1), (3, 1), (2, 2)])
def test_chunks_equal_batchnorm_called_once_per_chunk(k, b):
    ref_bn, bn = _bn().train(), _bn().train()
    xs = _inputs(k, b)
    ref, got = _run(ref_bn, xs, stack=False), _run(bn, xs, stack=True)
    for r, o in zip(ref[0] + ref[1] + [ref[2], ref[3]], got[0] + got[1] + [got[2], got[3]]):
        torch.testing.assert_close(o, r, **F64)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn, name), getattr(ref_bn, name), **F64)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == k


def test_running_statistics_follow_the_recurrence_in_chunk_order():
    """By hand: r ← 0.9·r + 0.1·s_j for chunk 0, then chunk 1 (unbiased variance); the
    reversed order gives other numbers, so the order is tested."""
    bn = _bn()
    r_mean, r_var = bn.running_mean.clone(), bn.running_var.clone()
    xs = _inputs(2, 1)
    chunked_batch_norm(bn, torch.cat(xs), 2)
    for x in xs:
        r_mean = 0.9 * r_mean + 0.1 * x.mean(dim=(0, 2, 3))
        r_var = 0.9 * r_var + 0.1 * x.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_mean, r_mean, **F64)
    torch.testing.assert_close(bn.running_var, r_var, **F64)
    rev = _bn()
    chunked_batch_norm(rev, torch.cat(xs[::-1]), 2)
    assert (rev.running_mean - bn.running_mean).abs().max() > 1e-3


def test_the_module_is_plain_batchnorm_outside_stacked_and_in_eval_mode():
    ref, bn = _bn(), StackableBatchNorm2d(5).double()
    bn.load_state_dict(ref.state_dict())
    assert list(bn.state_dict()) == list(ref.state_dict())  # the same keys: checkpoints
    x = torch.cat(_inputs(2, 1))
    torch.testing.assert_close(bn(x), ref(x), **F64)  # k = 1: one batch of 2
    bn.eval(), ref.eval()
    with stacked(2):
        torch.testing.assert_close(bn(x), ref(x), **F64)  # eval: running statistics
    assert stacked_chunks() == 1


def test_channels_last_stays_channels_last():
    bn = _bn()
    x = torch.cat(_inputs(2, 1)).contiguous(memory_format=torch.channels_last)
    y = chunked_batch_norm(copy.deepcopy(bn), x, 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = torch.cat([bn(c) for c in x.chunk(2)])
    torch.testing.assert_close(y, ref, **F64)


def test_bad_uses_say_what_is_wrong():
    bn = _bn()
    with pytest.raises(ValueError, match="batch of 3 is not 2 equal forwards"):
        chunked_batch_norm(bn, torch.cat(_inputs(3, 1)), 2)
    bn.momentum = None
    with pytest.raises(ValueError, match="need a BatchNorm momentum"):
        chunked_batch_norm(bn, torch.cat(_inputs(2, 1)), 2)
    with pytest.raises(ValueError, match="k >= 1"), stacked(0):
        pass


def _project(outs, seed=3):
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, dtype=o.dtype, generator=g)).sum() for o in outs)


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_a_deeplab_stacked_equals_two_forwards():
    torch.manual_seed(0)
    ref = DeepLabV2(4, multi_level=True, layers=(1, 1, 2, 1), width=8).double().train()
    net = copy.deepcopy(ref)
    a, b = _inputs(2, 1, c=3, h=24, w=40)
    outs_ref = _flat(ref(a)) + _flat(ref(b))
    with stacked(2):
        both = net(torch.cat((a, b)))
    pa, pb = split_stacked(both, 2)
    outs = _flat(pa) + _flat(pb)
    _project(outs_ref).backward()
    _project(outs).backward()
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o, r, **F64)
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    for (n, x), y in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(x, y, **F64, msg=n)


def test_accel_pair_stacked_equals_two_calls():
    from sfc.losses import accel_pair

    torch.manual_seed(0)
    ref = Accel(4, layers=(1, 1, 1, 1), width=8).double().train()
    net = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(5)
    clips = [torch.randn(1, 3, 2, 32, 48, dtype=torch.float64, generator=g) * (1 + j)
             for j in range(4)]
    outs_ref = accel_pair(ref, *clips, stack=False)
    outs = accel_pair(net, *clips, stack=True)
    _project(outs_ref).backward()
    _project(outs).backward()
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o, r, **F64)
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(net.named_parameters(), ref.parameters())
             if q.grad is not None]
    assert any(n.startswith("flownet.") for n, _, _ in grads)
    for n, x, y in grads:
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12, msg=n)
    for (n, x), y in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(x, y, **F64, msg=n)


# ---- the SFC stages' iterations -------------------------------------------------------------
def _stage(kind, stack, **kw):
    from sfc.bench import steps

    bc = steps.BenchConfig(source_size=(64, 32), target_size=(64, 32), layers=(1, 1, 1, 1),
                           width=8, stack_forwards=stack, **kw)
    return steps.build(kind, bc), bc


def _state(stage):
    nets = [stage.nets[n] for n in stage.main_nets]
    return ([(n, p) for net in nets for n, p in net.named_parameters()]
            + [(n, b) for net in nets for n, b in net.named_buffers()])


def _double(batch):
    return None if batch is None else {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in batch.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["segnet_sfc", "accel_sfc"])
def test_sfc_iterations_with_stacked_forwards_equal_the_plain_ones(kind, dtype, monkeypatch):
    """Three engine iterations (`steps.train_iteration`: LR, zero_grad, step, optimiser step
    with the checks) from the same weights, with and without the switch, and the stacked path
    taken (chunked BatchNorm calls, k = 2, only in the stacked run). float64: the loss terms,
    every parameter update and BN buffer to 1e-9. float32: the loss terms to 1e-5 (the SFC
    term's softmax at scale 100 amplifies the convolutions' other summation order at batch 2
    into ~1e-2 relative differences of some stage-one updates; float64 shows they are
    rounding)."""
    import sfc.models.stacked as mod
    from sfc.bench import steps

    calls, real = [], mod.chunked_batch_norm
    monkeypatch.setattr(mod, "chunked_batch_norm", lambda *a: calls.append(a[2]) or real(*a))
    (plain, bc), (stack, _) = _stage(kind, False), _stage(kind, True)
    stack.load_saved_state(plain.saved_state())
    f64 = dtype == "float64"
    if f64:
        for st in (plain, stack):
            for net in st.nets.values():
                net.double()
    before = [t.detach().clone() for _, t in _state(plain)]
    for i in range(3):
        src, tgt = steps.make_batches(kind, bc, seed=20 + i)
        if f64:
            src, tgt = _double(src), _double(tgt)
        n = len(calls)
        t_plain = steps.train_iteration(plain, src, tgt, i)
        assert len(calls) == n
        t_stack = steps.train_iteration(stack, src, tgt, i)
        assert len(calls) > n and set(calls) == {2}
        assert set(t_plain) == set(t_stack) == {"seg", "sfc"}
        for k in t_plain:
            torch.testing.assert_close(float(t_stack[k]), float(t_plain[k]),
                                       rtol=1e-12 if f64 else 1e-5, atol=1e-7)
    if not f64:
        return
    for b0, (n, a), (_, b) in zip(before, _state(stack), _state(plain)):
        if a.is_floating_point():
            torch.testing.assert_close(a - b0, b - b0, rtol=1e-9, atol=1e-12, msg=n)
        else:
            assert torch.equal(a, b), n  # num_batches_tracked


def test_the_bn_control_run_stacks_too(tiny_data, tiny_runs, tmp_path):
    """`--bn-control --stack-forwards`: the control's target forwards (no loss) move the BN
    statistics as the plain control's do."""
    from conftest import TINY_TRAIN, stage_kind_flags

    from sfc import train
    from sfc.train import runio

    def run(out, *extra):
        return train.main(["--data", str(tiny_data), "--out", str(out), *TINY_TRAIN,
                           *stage_kind_flags("segnet_sfc", tiny_runs), "--bn-control",
                           "--iters", "2", "--eval-every", "2", "--seed", "4", *extra])

    assert run(tmp_path / "s", "--stack-forwards") == 0 and run(tmp_path / "p") == 0
    log = (tmp_path / "s" / "log.txt").read_text()
    assert "target forwards stacked in one batch (--stack-forwards)" in log
    assert "stacked" not in (tmp_path / "p" / "log.txt").read_text()
    cfg = {k: json.loads((tmp_path / k / "config.json").read_text())["config"]
           for k in ("s", "p")}
    assert cfg["s"]["precision"]["stack_forwards"] is True
    assert cfg["p"]["precision"]["stack_forwards"] is False
    m = {k: runio.load_checkpoint(tmp_path / k / "last.pt")["models"]["segnet"]
         for k in ("s", "p")}
    for name, v in m["p"].items():
        if "running" in name:
            torch.testing.assert_close(m["s"][name], v, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["segnet_sfc", "accel_sfc"])
def test_stacked_iterations_under_the_emulated_cuda_graph(kind):
    """`--cuda-graph --stack-forwards`: the captured (emulated) stacked iteration follows the
    eager stacked one."""
    from test_graphed import lockstep

    from sfc.train import graphed

    runner = lockstep(kind, graphed.TapeBackend(), stack_forwards=True)
    assert runner.captured


def test_the_stacked_output_is_no_tracked_view():
    """At b = 1 the BatchNorm output is an untracked view (`_unsafe_view`): the networks' in-place
    ReLU and residual add on a tracked view would make the backward copy whole activations.
    A DeepLab-v2 forward and backward stacked runs no `copy_`, `clone` or `as_strided` beyond
    those of the two forwards apart."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[func.__name__.split(".")[0]] += 1
            return func(*args, **(kwargs or {}))

    y = chunked_batch_norm(_bn(), torch.cat(_inputs(2, 1)), 2)
    assert not y._is_view()
    torch.manual_seed(0)
    net = DeepLabV2(4, multi_level=True, layers=(1, 1, 1, 1), width=8).train()
    a, b = (torch.randn(1, 3, 32, 48) for _ in range(2))
    counts = []
    for stack in (False, True):
        ops = Ops()
        with ops:
            if stack:
                with stacked(2):
                    outs = _flat(net(torch.cat((a, b))))
            else:
                outs = _flat(net(a)) + _flat(net(b))
            sum(o.sum() for o in outs).backward()
        counts.append(ops.n)
    for op in ("copy_", "clone", "as_strided"):
        assert counts[1][op] <= counts[0][op], (op, counts[0][op], counts[1][op])
    assert counts[1]["convolution"] < counts[0]["convolution"]
