"""The training engine in two processes (gloo, CPU), as torchrun would launch it: DDP gives the
mean of the single-process gradients of the two ranks' clips, also on the SFC paths (source
backward under no_sync, two forwards before one backward), and the replicas stay identical."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_TRAIN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, argv, dump):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from sfc import dist, train
    from sfc.train import engine

    args = train.resolve(train.build_parser().parse_args(argv))
    trainer = engine.Trainer(args, train.build_data(args))
    stage, seen = trainer.stage, {}
    step, train_step = stage.optimizer.step, stage.train_step

    def record_inputs(src, tgt):
        if "src" not in seen:
            seen["src"], seen["tgt"] = src, tgt
        return train_step(src, tgt)

    def record_grads(*a, **k):
        if "grads" not in seen:
            seen["grads"] = {n: p.grad.clone() for net in stage.main_nets
                             for n, p in stage.nets[net].named_parameters()
                             if p.grad is not None}
        return step(*a, **k)

    stage.train_step, stage.optimizer.step = record_inputs, record_grads
    rc = trainer.run()
    sd = {k: v for net in stage.main_nets for k, v in stage.nets[net].state_dict().items()}
    torch.save({"rc": rc, "sd": sd, "ddp": sorted(stage.ddp), **seen}, f"{dump}/rank{rank}.pt")
    trainer.close()
    dist.cleanup()


def _two_ranks(argv, dump):
    mp.start_processes(_worker, args=(2, _free_port(), argv, str(dump)), nprocs=2, join=True,
                       start_method="spawn")
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _single_process_grads(argv, batches):
    """The gradient of each rank's clip in one process, from the same initial state."""
    from sfc import train
    from sfc.train.stages import build_stage

    args = train.resolve(train.build_parser().parse_args(argv))
    grads = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same kernels, the same float32 rounding
    for src, tgt in batches:
        torch.manual_seed(args.seed)
        stage = build_stage(args, torch.device("cpu"), log=lambda s: None)
        stage.train_mode()
        stage.set_iteration_lr(0)
        stage.optimizer.zero_grad(set_to_none=True)
        stage.train_step(src, tgt)
        grads.append({n: p.grad.clone() for net in stage.main_nets
                      for n, p in stage.nets[net].named_parameters() if p.grad is not None})
    torch.set_num_threads(threads)
    return grads


def _check_ddp_mean(ranks, argv):
    assert [r["rc"] for r in ranks] == [0, 0]
    assert ranks[0]["src"]["name"] != ranks[1]["src"]["name"]  # each rank its own clip
    single = _single_process_grads(argv, [(r["src"], r["tgt"]) for r in ranks])
    assert set(ranks[0]["grads"]) == set(single[0]) and len(single[0]) > 10
    worst = 0.0
    for name, g in ranks[0]["grads"].items():
        assert torch.equal(g, ranks[1]["grads"][name]), name  # one all-reduced gradient
        mean = (single[0][name] + single[1][name]) / 2
        rel = ((g - mean).norm() / mean.norm().clamp(min=1e-30)).item()
        worst = max(worst, rel)
    print(f"DDP vs mean of single-process gradients: worst relative difference {worst:.2e}")
    assert worst <= 1e-6, worst
    for k, v in ranks[0]["sd"].items():  # replicas identical (BN broadcast before the eval)
        assert torch.equal(v, ranks[1]["sd"][k]), k


@pytest.mark.slow
def test_ddp_sfc_stage_one_equals_mean_of_single_process_gradients(tiny_data, tiny_runs,
                                                                   tmp_path):
    argv = ["--stage", "segnet", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
            *TINY_TRAIN, "--imagenet-init", "none", "--iters", "1", "--eval-every", "1",
            "--sfc-weight", "0.005", "--flownet-ckpt", str(tiny_runs["accel"]),
            "--sfm-ckpt", str(tiny_runs["sfm"]), "--device", "cpu"]
    ranks = _two_ranks(argv, tmp_path)
    assert ranks[0]["ddp"] == ["segnet"] and ranks[0]["tgt"] is not None
    _check_ddp_mean(ranks, argv)
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert (out / "log.txt").read_text().count("stage segnet ->") == 1  # one writer


@pytest.mark.slow
def test_ddp_sfc_stage_two_equals_mean_of_single_process_gradients(tiny_data, tiny_runs,
                                                                   tmp_path):
    argv = ["--stage", "accel", "--data", str(tiny_data), "--out", str(tmp_path / "run"),
            *TINY_TRAIN, "--chairs-init", "none", "--iters", "1", "--eval-every", "1",
            "--update-ckpt", str(tiny_runs["segnet"]),
            "--reference-ckpt", str(tiny_runs["segnet"]), "--sfc-weight", "0.001",
            "--flownet-ckpt", str(tiny_runs["accel"]), "--sfm-ckpt", str(tiny_runs["sfm"]),
            "--device", "cpu"]
    ranks = _two_ranks(argv, tmp_path)
    assert ranks[0]["ddp"] == ["accel"] and ranks[0]["tgt"]["seg"].shape[2] == 3
    _check_ddp_mean(ranks, argv)


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(tiny_data, tmp_path, capsys):
    from sfc import train

    out = tmp_path / "run"
    argv = ["--stage", "segnet", "--data", str(tiny_data), "--out", str(out), *TINY_TRAIN,
            "--imagenet-init", "none", "--iters", "2", "--eval-every", "1", "--stop-after", "1",
            "--device", "cpu"]
    ranks = _two_ranks(argv, tmp_path)
    assert [r["rc"] for r in ranks] == [0, 0]
    assert train.main(argv) == 2  # one process now: the data order would change
    assert "world_size 2 -> 1" in capsys.readouterr().err


def test_ddp_wrapping_without_deprecation_warnings(tmp_path, tiny_data):
    """torch 2.14 deprecates `broadcast_buffers`; the stage uses `forward_sync_buffers=False`
    where it exists (rank 0's buffers broadcast once, never in the forward), else the old flag
    plus a broadcast by hand. No FutureWarning either way."""
    import warnings

    import torch.distributed as td

    from sfc import train
    from sfc.train.stages import build_stage

    args = train.resolve(train.build_parser().parse_args(
        ["--stage", "segnet", "--data", str(tiny_data), "--out", str(tmp_path / "r"),
         *TINY_TRAIN, "--imagenet-init", "none", "--device", "cpu"]))
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                          world_size=1)
    try:
        stage = build_stage(args, torch.device("cpu"), log=lambda s: None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stage.wrap_ddp()
        assert not [w for w in caught if issubclass(w.category, FutureWarning)], [
            str(w.message) for w in caught]
        ddp = stage.ddp["segnet"]
        assert getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)) \
            is False
    finally:
        td.destroy_process_group()


def test_evaluation_heads_in_the_precision_of_the_runs_validation(tiny_runs, tmp_path):
    """sfc.evaluate builds an SFC stage's network with float32 heads under bf16 autocast, as
    that run's own validation did; other runs keep autocast heads."""
    from sfc.evaluate.checkpoint import build_model, inspect_checkpoint

    src = tiny_runs["segnet"] / "best.pt"
    assert build_model(inspect_checkpoint(str(src), "segnet")).fp32_heads is False
    ck = torch.load(src, weights_only=True, map_location="cpu")
    ck["config"]["sfc_weight"] = 0.005
    torch.save(ck, tmp_path / "sfc.pt")
    assert build_model(inspect_checkpoint(str(tmp_path / "sfc.pt"), "segnet")).fp32_heads
