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
