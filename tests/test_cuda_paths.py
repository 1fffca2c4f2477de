"""The CUDA paths where they run (issue 17, item 7; needs a GPU, skipped otherwise): one bf16 +
channels_last training step of every stage kind at a small size, `sfc.predict` and
`sfc.evaluate` on CUDA, and the RNG state of the process's own device only."""

import json

import pytest
import torch
from conftest import STAGE_KINDS, TINY_TRAIN, stage_kind_flags

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = ["--device", "cuda", "--amp", "bf16", "--channels-last", "--iters", "2",
        "--eval-every", "2"]


def _train(data, out, *extra) -> int:
    from sfc import train

    return train.main(["--data", str(data), "--out", str(out), *TINY_TRAIN, *CUDA, *extra])


@pytest.mark.parametrize("kind", STAGE_KINDS)
def test_one_bf16_channels_last_step_of_each_stage_kind(kind, tiny_data, tiny_runs, tmp_path):
    args = stage_kind_flags(kind, tiny_runs)
    out = tmp_path / kind
    assert _train(tiny_data, out, *args) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["last"]["iter"] == 2 and result["last"]["value"] is not None
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["precision"]["autocast"] == "bf16"
    ck = torch.load(out / "last.pt", weights_only=True, map_location="cpu")
    assert "cuda_device" in ck["rng"] and "cuda" not in ck["rng"]  # its own device only


def test_predict_and_evaluate_on_cuda(tiny_data, tiny_runs, tmp_path):
    from sfc.evaluate import main as evaluate
    from sfc.predict.cli import main as predict

    ckpt = tiny_runs["accel"] / "best.pt"
    frames = sorted((tiny_data / "Cityscapes" / "leftImg8bit_sequence" / "val").iterdir())[0]
    assert predict(["--checkpoint", str(ckpt), "--frames", str(frames), "--out",
                    str(tmp_path / "pred"), "--limit", "6", "--device", "cuda",
                    "--no-progress"]) == 0
    assert json.loads((tmp_path / "pred" / "predict.json").read_text())["complete"] is True
    rec = tmp_path / "e.json"
    for amp in ([], ["--amp", "bf16"]):
        assert evaluate(["--checkpoint", str(ckpt), "--data", str(tiny_data), "--device",
                         "cuda", *amp, "--workers", "0", "--no-progress", "--json",
                         str(rec), "--temporal-consistency", "--tc-flow", "gt"]) == 0
        r = json.loads(rec.read_text())
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 < r["temporal_consistency"]["tc"] <= 1.0


def test_rng_state_of_the_own_device_round_trips():
    from sfc.train import runio

    dev = torch.device("cuda", torch.cuda.current_device())
    state = runio.rng_state(dev)
    assert set(state) == {"python", "numpy", "torch", "cuda_device"}
    a = torch.rand(4, device=dev)
    runio.set_rng_state(state, dev)
    assert torch.equal(torch.rand(4, device=dev), a)


# ---- issue 18, item 2: the deferred finiteness checks on the GPU ---------------------------
def _bench_stage(kind, every="50", **kw):
    from sfc.bench import steps

    bc = steps.BenchConfig(device="cuda", source_size=(64, 32), target_size=(64, 32),
                           layers=(1, 1, 1, 1), width=8, check_every=every, **kw)
    stage = steps.build(kind, bc)
    return stage, *steps.make_batches(kind, bc)


@pytest.mark.parametrize("kind", ["segnet", "segnet_sfc", "accel", "accel_sfc"])
def test_deferred_checks_step_without_host_sync(kind):
    """With --check-every > 1 a whole training iteration (losses, flow flags, backward, the
    step with its discarded-update selection) runs with no host sync: CUDA's sync debug mode
    raises on any synchronising call. (The SFM stage reads its label classes on purpose.)"""
    from sfc.bench import steps

    stage, src, tgt = _bench_stage(kind)
    steps.train_iteration(stage, src, tgt, 0)  # lazy initialisation, cuDNN choices
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps.train_iteration(stage, src, tgt, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stage.guard.read() is None


def test_deferred_nan_flow_on_cuda_discards_the_update():
    """A NaN flow on CUDA (no pre-backward read there): the backward runs without a crash, the
    update is discarded on the device, and the read names the flow term."""
    from sfc.bench import steps

    stage, src, tgt = _bench_stage("accel")
    steps.train_iteration(stage, src, tgt, 0)
    with torch.no_grad():
        stage.nets["accel"].flownet.predict_flow2.bias.fill_(float("nan"))
    before = [p.detach().clone() for p in stage.trainable_parameters()]
    steps.train_iteration(stage, src, tgt, 1)
    assert stage.guard.read() == (2, "flow", "accel.flownet", 0)
    for b, p in zip(before, stage.trainable_parameters()):  # NaN where we put it, else equal
        assert torch.equal(b.nan_to_num(), p.detach().nan_to_num())


def test_engine_iterations_have_no_host_sync(tiny_data, tmp_path):
    """The whole engine iteration on CUDA (batch fetch and copy, LR, step, deferred checks,
    progress) synchronises nowhere: a run of 7 iterations makes exactly as many synchronising
    calls as one of 3 (the reads at iteration 1 and at the end, the final evaluation and
    saves), counted by CUDA's sync debug mode."""
    import warnings

    from sfc import train

    found = {}
    for iters in (3, 7):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                rc = train.main(["--data", str(tiny_data), "--out", str(tmp_path / f"r{iters}"),
                                 *TINY_TRAIN, "--stage", "segnet", "--imagenet-init", "none",
                                 "--device", "cuda", "--iters", str(iters), "--eval-every",
                                 "1000", "--log-every", "1000", "--check-every", "1000",
                                 "--progress", "lines"])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert rc == 0
        found[iters] = [str(w.message).splitlines()[0] for w in caught
                        if "synchroniz" in str(w.message).lower()]
    assert len(found[7]) == len(found[3]), found[7]


# ---- issue 18: --cuda-graph, the iteration as one CUDA graph --------------------------------
@pytest.mark.parametrize("kind", ["segnet", "segnet_sfc", "accel", "accel_sfc"])
def test_cuda_graph_iteration_follows_the_eager_one(kind):
    """Real capture and replay, in lockstep with the eager iteration from identical states on a
    different batch and LR each iteration (tests/test_graphed.py: loss terms rtol 1e-5,
    updates rtol 1e-3)."""
    from test_graphed import lockstep

    runner = lockstep(kind, None, device="cuda")
    assert runner.captured and runner.backend.graph is not None


@pytest.mark.parametrize("kind", ["segnet_sfc", "accel_sfc"])
def test_cuda_graph_stacked_iteration_follows_the_eager_one(kind):
    """`--cuda-graph --stack-forwards`: the captured stacked iteration in lockstep with the
    eager stacked one (as above)."""
    from test_graphed import lockstep

    runner = lockstep(kind, None, device="cuda", stack_forwards=True)
    assert runner.captured and runner.backend.graph is not None


def test_cuda_graph_nan_after_capture_is_found_and_discarded_stickily():
    """In a real graph the guard's record must be updated in place, or a replay would read the
    capture's stale copy: the bad iteration is named and its update and the next are
    discarded."""
    from test_graphed import nan_after_capture

    nan_after_capture(None, device="cuda")


def test_cuda_graph_pair_replayed_on_two_streams_equals_one_after_the_other():
    """Two runs' graphs replayed at the same time on their own streams (`sfc.bench
    --side-by-side-mode streams`): each reads its own batch of the iteration and writes only
    its own state — the same loss terms and updates as replayed one after the other."""
    from test_graphed import concurrent_pair

    runs = concurrent_pair(None, device="cuda")
    assert runs[0][1].backend.stream != runs[1][1].backend.stream


def test_engine_cuda_graph_replays_without_host_sync(tiny_data, tmp_path):
    """The engine with --cuda-graph: a run of 9 iterations makes as many synchronising calls as
    one of 5 (both warm up 3 iterations and capture the 4th), and says so in its log."""
    import warnings

    from sfc import train

    found = {}
    for iters in (5, 9):
        out = tmp_path / f"r{iters}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                rc = train.main(["--data", str(tiny_data), "--out", str(out), *TINY_TRAIN,
                                 "--stage", "segnet", "--imagenet-init", "none", "--device",
                                 "cuda", "--iters", str(iters), "--eval-every", "1000",
                                 "--log-every", "1000", "--check-every", "1000",
                                 "--progress", "lines", "--cuda-graph"])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert rc == 0
        assert "captured as one CUDA graph" in (out / "log.txt").read_text()
        found[iters] = [str(w.message).splitlines()[0] for w in caught
                        if "synchroniz" in str(w.message).lower()]
    assert len(found[9]) == len(found[5]), found[9]
