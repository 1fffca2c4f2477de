"""Shared pytest fixtures (keep minimal; test files may add their own)."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs 2 pytest-xdist workers on the 2-core machine: one intra-op thread per
    # worker (and per child process it starts), else the workers oversubscribe the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)

# A DeepLabV2 / Accel backbone small enough for CPU tests: same structure and key layout as the
# paper's ResNet-101, one block per layer, width 8 (layer4 outputs 256 channels).
SMALL = {"layers": (1, 1, 1, 1), "width": 8}


@pytest.fixture
def small_backbone():
    """Keyword arguments for a tiny DeepLabV2/Accel backbone."""
    return dict(SMALL)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def single_thread():
    """One intra-op thread for tests on tiny tensors: on a shared 2-core machine, thread
    oversubscription made these tests ~5× slower; results are unaffected."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- shared synthetic data and tiny earlier runs (one per pytest worker) -------------------
TINY_TRAIN = ["--layers", "1", "1", "1", "1", "--width", "8", "--source-size", "64", "32",
              "--target-size", "64", "32", "--num-workers", "0", "--val-limit", "2",
              "--log-every", "1"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny VIPER + Cityscapes-Seq tree in the real layouts (read-only for tests)."""
    from sfc.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny_data")
    generate(root, seed=0, tiny=True, datasets=("viper", "cityscapes"))
    return root


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory):
    """Finished 2-iteration runs of the stages that later ones consume: a stage-one SegNet
    (`segnet`, used as update and reference), FlowNet_pretrain stage two (`accel`) and the SFM
    (`sfm`), at the TINY_TRAIN size. Returns {name: run directory}."""
    from sfc import train

    d = tmp_path_factory.mktemp("tiny_runs")
    common = ["--data", str(tiny_data), *TINY_TRAIN, "--iters", "2", "--eval-every", "2"]
    runs = {"segnet": d / "segnet", "accel": d / "accel", "sfm": d / "sfm"}
    assert train.main(["--stage", "segnet", "--out", str(runs["segnet"]), *common,
                       "--imagenet-init", "none"]) == 0
    assert train.main(["--stage", "accel", "--out", str(runs["accel"]), *common,
                       "--chairs-init", "none", "--update-ckpt", str(runs["segnet"]),
                       "--reference-ckpt", str(runs["segnet"])]) == 0
    assert train.main(["--stage", "sfm", "--out", str(runs["sfm"]), *common,
                       "--flownet-ckpt", str(runs["accel"])]) == 0
    return runs


STAGE_KINDS = ("segnet", "segnet_sfc", "accel", "accel_sfc", "sfm")


def stage_kind_flags(kind: str, runs: dict) -> list[str]:
    """The sfc.train flags of one stage kind on the tiny earlier runs (`tiny_runs`)."""
    sfc = ["--flownet-ckpt", str(runs["accel"]), "--sfm-ckpt", str(runs["sfm"])]
    accel = ["--stage", "accel", "--chairs-init", "none", "--update-ckpt", str(runs["segnet"]),
             "--reference-ckpt", str(runs["segnet"])]
    return {
        "segnet": ["--stage", "segnet", "--imagenet-init", "none"],
        "segnet_sfc": ["--stage", "segnet", "--imagenet-init", "none", "--sfc-weight", "0.005",
                       *sfc],
        "accel": accel,
        "accel_sfc": [*accel, "--sfc-weight", "0.001", *sfc],
        "sfm": ["--stage", "sfm", "--flownet-ckpt", str(runs["accel"])],
    }[kind]
