"""`--cuda-graph` (sfc.train.graphed, issue 18): the captured iteration on the CPU.

A real CUDA graph needs a GPU (tests/test_cuda_paths.py runs the same lockstep check with real
capture). Here `graphed.TapeBackend` emulates one: the capture records the step's aten ops and a
replay re-runs them on the same tensors with every Python value frozen as captured, refusing
host reads and host data. The first tests check the emulation itself against hand-computed
cases; the others what the runner must get right under it: each iteration's batch reaches the
static one, each iteration's LR reaches the optimiser's LR tensors, each iteration's number
reaches the guard, nothing else the step takes from Python changes between iterations (the
lockstep against the eager iteration), the warm-up count, fixed shapes, the engine's wiring and
resume.
"""

import argparse

import pytest
import torch

from sfc.train import graphed, optim


def _cfg(**kw):
    base = {"stage": "segnet", "check_every": "auto"}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw,device,world,expect", [
    ({}, "cuda", 1, None),
    ({"stage": "accel", "check_every": "7"}, "cuda:0", 1, None),
    ({}, "cpu", 1, "needs a CUDA device, got --device cpu"),
    ({}, "cuda", 2, "runs in one process (got 2)"),
    ({"stage": "sfm"}, "cuda", 1, "not sfm (its step reads on the host which label classes"),
    ({"stage": "flownet"}, "cuda", 1, "not flownet (its Adam step"),
    ({"check_every": "1"}, "cuda", 1, "needs the deferred finiteness checks"),
    ({"compile": "reduce-overhead"}, "cuda", 1, "both capture CUDA graphs"),
    ({"compile": "default"}, "cuda", 1, None),
])
def test_unsupported_names_the_reason(kw, device, world, expect):
    why = graphed.unsupported(_cfg(**kw), torch.device(device), world)
    if expect is None:
        assert why is None
    else:
        assert expect in why


def test_cuda_graph_on_cpu_is_a_one_line_flag_error(capsys, tmp_path):
    from sfc import train

    rc = train.main(["--stage", "segnet", "--imagenet-init", "none", "--data", str(tmp_path),
                     "--out", str(tmp_path / "run"), "--device", "cpu", "--cuda-graph"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["sfc.train: error: --cuda-graph needs a CUDA device, got --device cpu"]


def test_lr_tensors_update_within_rounding_and_stay_out_of_the_state_dict():
    """`use_lr_tensors`: the update `p − (lr·d)` with LRs filled by `set_lr` equals the number
    path (PyTorch's single-tensor SGD loop, per-parameter repeats) within float32 rounding, over
    a first step and later ones at changing LRs; the state dict is the number path's."""
    from sfc.models import DeepLabV2

    torch.manual_seed(0)
    a = DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8)
    b = DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8)
    b.load_state_dict(a.state_dict())
    oa, ob = (optim.make_sgd(optim.segnet_param_groups(n, 1e-3, release=True), lr=1e-3,
                             foreach=False) for n in (a, b))
    ob.use_lr_tensors()
    g = torch.Generator().manual_seed(1)
    for lr in (1e-3, 3e-3, 2e-2):
        optim.set_lr(oa, lr)
        optim.set_lr(ob, lr)
        assert [float(t) for t in ob.lr_tensors] == pytest.approx([lr, 10 * lr], rel=1e-6)
        for pa, pb in zip(a.parameters(), b.parameters()):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        pa_list = [p for grp in oa.param_groups for p in grp["params"]]
        pb_list = [p for grp in ob.param_groups for p in grp["params"]]
        before = [p.detach().clone() for p in pa_list]
        oa.step()
        ob.step()
        for p0, pa, pb in zip(before, pa_list, pb_list):
            upd_a, upd_b = pa.detach() - p0, pb.detach() - p0
            assert upd_a.abs().max() > 0
            torch.testing.assert_close(upd_b, upd_a, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)  # a few ulp
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert not any(torch.is_tensor(v) for grp in sb["param_groups"] for v in grp.values())


# ---- the emulated graph itself, on hand-built cases ------------------------------------------
def test_the_emulated_graph_replays_ops_with_python_values_frozen():
    """A replay re-runs the recorded ops on the same tensors: in-place state advances again, a
    new input (copied into the static tensor) flows through, and a Python number read by the
    step keeps its value at the capture — as in a CUDA graph."""
    x = torch.tensor([1.0, 2.0])
    acc = torch.zeros(2)
    scale = {"s": 3.0}

    def step():
        y = (x * scale["s"]).relu()
        acc.add_(y)
        return {"y": y, "sum": acc.sum()}

    tape = graphed.TapeBackend()
    out = tape.capture(step)
    assert torch.equal(out["y"], torch.tensor([3.0, 6.0])) and float(out["sum"]) == 9.0
    x.copy_(torch.tensor([-1.0, 5.0]))
    scale["s"] = 100.0  # Python state: frozen in the graph
    tape.replay()
    assert torch.equal(out["y"], torch.tensor([0.0, 15.0]))
    assert torch.equal(acc, torch.tensor([3.0, 21.0]))
    assert float(out["sum"]) == 24.0


@pytest.mark.parametrize("body,match", [
    (lambda x: x * x.sum().item(), r"_local_scalar_dense.*reads a device value on the host"),
    (lambda x: x[x > 0], r"aten.index.Tensor reads a device value on the host"),
    (lambda x: x + torch.tensor([1.0, 2.0]), r"lift_fresh.*makes a tensor from host data"),
])
def test_the_emulated_graph_refuses_what_a_capture_cannot_record(body, match):
    x = torch.tensor([1.0, 2.0])
    with pytest.raises(graphed.NotCapturable, match=match):
        graphed.TapeBackend().capture(lambda: body(x))


def test_a_python_lr_goes_stale_in_the_emulated_graph(monkeypatch):
    """Without the LR tensors the optimiser bakes the capture's LR into the graph: the lockstep
    (a different LR each iteration) must see it. It is what the emulation adds over re-running
    the step."""
    monkeypatch.setattr(optim.RepeatedSGD, "use_lr_tensors",
                        lambda self: setattr(self, "lr_tensors", None))
    with pytest.raises(AssertionError):
        lockstep("segnet", graphed.TapeBackend())


def test_the_cpu_flow_check_would_not_capture():
    """On the CPU the guard reads the flows' finiteness at once (a host read); the runner under
    the emulation runs the CUDA program, which defers it — with the CPU program the capture is
    refused at that read."""
    st, bc = _stage("accel")
    runner = graphed.GraphedStep(st, warmup=1, backend=graphed.TapeBackend())
    assert st.guard.flows_at_once is False
    from sfc.bench import steps

    src, tgt = steps.make_batches("accel", bc)
    steps.train_iteration(st, src, tgt, 0, runner=runner)
    st.guard.flows_at_once = True
    with pytest.raises(RuntimeError, match=r"capturing iteration 2 failed \(NotCapturable: "
                                           r"aten._local_scalar_dense"):
        steps.train_iteration(st, src, tgt, 1, runner=runner)


# ---- the runner, lockstep against the eager iteration ---------------------------------------
def _stage(kind, device="cpu", **kw):
    from sfc.bench import steps

    bc = steps.BenchConfig(device=device, source_size=(64, 32), target_size=(64, 32),
                           layers=(1, 1, 1, 1), width=8, check_every="5", **kw)
    st = steps.build(kind, bc)
    st.lr_at = lambda i: 1e-3 * (1 + i)  # a different LR each iteration: a stale one shows
    return st, bc


def _state(stage):
    """Every tensor a step changes: parameters, buffers, momentum buffers (in place)."""
    nets = [stage.nets[n] for n in stage.main_nets]
    out = [p for net in nets for p in net.parameters()]
    out += [b for net in nets for b in net.buffers()]
    out += [stage.optimizer.state[p]["momentum_buffer"] for p in stage.trainable_parameters()
            if "momentum_buffer" in stage.optimizer.state[p]]
    return out


def lockstep(kind, backend, device="cpu", iters=6, warmup=2, **kw):
    """Run `iters` iterations of a graph runner (`backend`; None: a real CUDA graph) and of
    the eager engine
    iteration from identical states (the eager twin's state is copied in place into the
    runner's before each one, as a captured graph needs), on a different batch each time, and
    compare the loss terms and the updates. `kw`: more `steps.BenchConfig` fields of both.
    Returns the runner."""
    from sfc.bench import steps

    eager, bc = _stage(kind, device, **kw)
    graph_stage, _ = _stage(kind, device, **kw)
    runner = graphed.GraphedStep(graph_stage, warmup=warmup, backend=backend)
    for i in range(iters):
        src, tgt = steps.make_batches(kind, bc, seed=100 + i)
        if i > 0:
            with torch.no_grad():
                torch._foreach_copy_(_state(graph_stage), _state(eager))
        before = [t.detach().clone() for t in _state(eager)]
        t_eager = steps.train_iteration(eager, src, tgt, i)
        t_graph = steps.train_iteration(graph_stage, src, tgt, i, runner=runner)
        assert runner.captured == (i >= warmup)
        for k in t_eager:
            torch.testing.assert_close(float(t_graph[k]), float(t_eager[k]), rtol=1e-5,
                                       atol=1e-7)
        pairs = list(zip(before, _state(eager), _state(graph_stage)))
        assert len(pairs) == len(before)
        for b, e, g in pairs:
            if e.is_floating_point():
                torch.testing.assert_close(g - b, e - b, rtol=1e-3, atol=1e-6)
            else:
                assert torch.equal(g, e)  # num_batches_tracked
    assert eager.guard.read() is None and graph_stage.guard.read() is None
    return runner


@pytest.mark.parametrize("kind", ["segnet", "segnet_sfc", "accel", "accel_sfc"])
def test_runner_follows_the_eager_iteration(kind):
    runner = lockstep(kind, graphed.TapeBackend())
    assert runner.warm_done == 2 and runner.calls_to_capture == 0


def concurrent_pair(backend_factory, device="cpu", kind="segnet_sfc", iters=5, warmup=1):
    """Two runs of `kind` (other weights, other batches each iteration), each a graph runner,
    replayed concurrently (`concurrent=True`, joined after both were launched) against the
    same two runs replayed one after the other from identical states: the loss terms and the
    updates agree (rtol 1e-5 / 1e-3 as `lockstep`), i.e. each replay read its own batch of
    that iteration and nothing of the other run. `backend_factory`: None for real graphs."""
    from sfc.bench import steps

    def pair():
        runs = []
        for r in range(2):
            st, bc = _stage(kind, device)
            with torch.no_grad():
                for t in _state(st):
                    if t.is_floating_point():
                        t.mul_(1 + 0.25 * r)  # the runs of a pair have other weights
            backend = backend_factory() if backend_factory else None
            runs.append((st, graphed.GraphedStep(st, warmup=warmup, backend=backend), bc))
        return runs

    together, apart = pair(), pair()
    before = [[t.detach().clone() for t in _state(st)] for st, _, _ in apart]
    for i in range(iters):
        batches = [steps.make_batches(kind, bc, seed=10 * i + r)
                   for r, (_, _, bc) in enumerate(apart)]
        t_apart = [steps.train_iteration(st, *b, i, runner=run)
                   for (st, run, _), b in zip(apart, batches)]
        t_apart = [{k: float(v) for k, v in t.items()} for t in t_apart]
        t_together = []
        for (st, run, _), b in zip(together, batches):
            st.train_mode()
            st.set_iteration_lr(i)
            t_together.append(run(i, b, concurrent=run.captured))
        for _, run, _ in together:
            run.join()
        for ta, tt in zip(t_apart, t_together):
            for k in ta:
                torch.testing.assert_close(float(tt[k]), ta[k], rtol=1e-5, atol=1e-7)
    assert all(run.captured for _, run, _ in together)
    for b0, (st_a, _, _), (st_t, _, _) in zip(before, apart, together):
        for b, a, t in zip(b0, _state(st_a), _state(st_t)):
            if a.is_floating_point():
                torch.testing.assert_close(t - b, a - b, rtol=1e-3, atol=1e-6)
            else:
                assert torch.equal(t, a)
    return together


def test_two_runners_replayed_concurrently_equal_one_after_the_other():
    """The plumbing of `sfc.bench --side-by-side-mode streams` (on the CPU the emulated graphs
    run one after the other; tests/test_cuda_paths.py runs it on two CUDA streams)."""
    concurrent_pair(graphed.TapeBackend)


def test_runner_needs_deferred_checks_and_a_warm_up():
    from sfc.bench import steps

    bc = steps.BenchConfig(device="cpu", source_size=(64, 32), target_size=(64, 32),
                           layers=(1, 1, 1, 1), width=8, check_every="1")
    st = steps.build("segnet", bc)
    with pytest.raises(ValueError, match="deferred finiteness checks"):
        graphed.GraphedStep(st, backend=graphed.TapeBackend())
    st2, _ = _stage("segnet")
    with pytest.raises(ValueError, match="at least one eager warm-up"):
        graphed.GraphedStep(st2, warmup=0, backend=graphed.TapeBackend())


def test_runner_rejects_another_shape_and_names_the_entry():
    from sfc.bench import steps

    st, bc = _stage("segnet")
    runner = graphed.GraphedStep(st, warmup=1, backend=graphed.TapeBackend())
    src, tgt = steps.make_batches("segnet", bc)
    for i in range(2):
        steps.train_iteration(st, src, tgt, i, runner=runner)
    small = {k: v[..., :16] for k, v in src.items()}
    with pytest.raises(ValueError, match=r"batch entry source\['seg'\] is \(1, 3, 2, 32, 16\)"):
        steps.train_iteration(st, small, tgt, 2, runner=runner)


def test_a_failed_capture_says_what_to_do():
    class Broken(graphed.TapeBackend):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    from sfc.bench import steps

    st, bc = _stage("segnet")
    runner = graphed.GraphedStep(st, warmup=1, backend=Broken())
    src, tgt = steps.make_batches("segnet", bc)
    steps.train_iteration(st, src, tgt, 0, runner=runner)
    with pytest.raises(RuntimeError, match=r"capturing iteration 2 failed \(RuntimeError: "
                                           r"operation not permitted.*without --cuda-graph"):
        steps.train_iteration(st, src, tgt, 1, runner=runner)
    assert not runner.captured


def test_nan_after_the_capture_is_found_and_discarded_stickily():
    nan_after_capture(graphed.TapeBackend())


def nan_after_capture(backend, device="cpu"):
    """A NaN loss in a replayed iteration (0-based 3): the read names 1-based iteration 4 (the
    runner's iteration tensor), and the parameters stay those after iteration 2 through a
    later finite iteration."""
    from sfc.bench import steps

    st, bc = _stage("segnet", device)
    runner = graphed.GraphedStep(st, warmup=1, backend=backend)
    for i in range(3):
        src, tgt = steps.make_batches("segnet", bc, seed=i)
        steps.train_iteration(st, src, tgt, i, runner=runner)
    kept = [p.detach().clone() for p in st.trainable_parameters()]
    src, tgt = steps.make_batches("segnet", bc, seed=3)
    steps.train_iteration(st, {**src, "seg": src["seg"] * float("nan")}, tgt, 3, runner=runner)
    src, tgt = steps.make_batches("segnet", bc, seed=4)
    steps.train_iteration(st, src, tgt, 4, runner=runner)
    assert st.guard.read() == (4, "loss", "seg", 0)
    for k, p in zip(kept, st.trainable_parameters()):
        assert torch.equal(k, p)


# ---- the engine's wiring (the graph emulated on the CPU) ------------------------------------
@pytest.fixture()
def emulated(monkeypatch):
    """`--cuda-graph` on the CPU through `TapeBackend`: the device checks pass."""
    monkeypatch.setattr(graphed, "unsupported", lambda *a, **k: None)
    monkeypatch.setattr(graphed, "CudaGraphBackend", graphed.TapeBackend)


@pytest.mark.parametrize("kind", ["segnet", "accel_sfc"])
def test_engine_runs_the_runner_and_resumes_exactly(kind, emulated, tiny_data, tiny_runs,
                                                    tmp_path):
    """The engine with --cuda-graph (the graph emulated; SFC stage two: the CUDA program's
    deferred flow checks inside it): it says so in the log, the result equals the eager run
    within float32 rounding, and a run stopped after iteration 4 and resumed (warm-up again,
    capture again) ends bit-identical to the uninterrupted one: warm-up and replay use the same
    update."""
    from conftest import TINY_TRAIN, stage_kind_flags

    from sfc import train
    from sfc.train import runio

    def run(out, *extra):
        return train.main(["--data", str(tiny_data), "--out", str(out), *TINY_TRAIN,
                           *stage_kind_flags(kind, tiny_runs), "--iters", "7",
                           "--eval-every", "7", "--check-every", "5", "--seed", "3", *extra])

    assert run(tmp_path / "eager") == 0
    assert run(tmp_path / "graph", "--cuda-graph") == 0
    assert run(tmp_path / "resumed", "--cuda-graph", "--stop-after", "4") == 0
    assert runio.load_checkpoint(tmp_path / "resumed" / "last.pt")["iter"] == 4
    assert run(tmp_path / "resumed", "--cuda-graph") == 0
    log = (tmp_path / "graph" / "log.txt").read_text()
    assert "--cuda-graph: the iteration is captured as one CUDA graph after 3 eager" in log
    assert "iteration 4: CUDA graph captured in " in log
    net = "segnet" if kind == "segnet" else "accel"
    m = {k: runio.load_checkpoint(tmp_path / k / "last.pt")["models"][net]
         for k in ("eager", "graph", "resumed")}
    for name, v in m["eager"].items():
        assert torch.equal(m["resumed"][name], m["graph"][name]), name
        if v.is_floating_point():
            torch.testing.assert_close(m["graph"][name], v, rtol=1e-4, atol=1e-6)
