"""The training engine in two processes (gloo, CPU), as torchrun would launch it."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, data_root, out, dump):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sfc import dist, train
    from sfc.train import engine

    args = train.resolve(train.build_parser().parse_args([
        "--stage", "segnet", "--data", data_root, "--out", out, "--iters", "2",
        "--eval-every", "2", "--layers", "1", "1", "1", "1", "--width", "8",
        "--source-size", "64", "32", "--target-size", "64", "32", "--num-workers", "0",
        "--imagenet-init", "none", "--device", "cpu"]))
    trainer = engine.Trainer(args, train.build_data(args))
    rc = trainer.run()
    sd = trainer.stage.nets["segnet"].state_dict()
    torch.save({"rc": rc, "sd": sd, "consumed": trainer.streams["source"].state_dict()},
               f"{dump}/rank{rank}.pt")
    trainer.close()
    dist.cleanup()


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    from sfc.data.synthetic import generate

    generate(tmp_path / "data", seed=0, tiny=True, datasets=("viper", "cityscapes"))
    out = tmp_path / "run"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "data"), str(out),
                                      str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["rc"] == 0 and r1["rc"] == 0
    # averaged gradients keep the replicas identical; BN buffers are broadcast before eval
    for k, v in r0["sd"].items():
        assert torch.equal(v, r1["sd"][k]), k
    res = json.loads((out / "result.json").read_text())  # written by rank 0 only
    assert res["last"]["iter"] == 2 and 0.0 <= res["last"]["value"] <= 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2
    log = (out / "log.txt").read_text()
    assert log.count("stage segnet ->") == 1  # one writer
