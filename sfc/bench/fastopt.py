"""The multi-tensor (`torch._foreach_*`) path of `sfc.train.optim.RepeatedSGD` (used on CUDA by
default; `foreach=True` forces it) and its exactness check against the single-tensor path.
Same update, elementwise the same operations in the same order:
for repeat r = 0..max(k)-1 it updates, in one foreach call per operation, every parameter whose
repeat count k exceeds r:
    d = g + λ·p;  first step: B ← d;  later: B ← m·B + d;  p ← p − η·(first ? d : B).
The single-tensor loop launches ~4 kernels per parameter per repeat (ResNet-101 stage one:
940 repeats → ~3,800 launches per step); this launches ~4 per repeat round (4 rounds).
Exactness against the single-tensor loop is tested on CPU (tests/test_bench.py) and on CUDA
(the same test, marked `cuda`).
"""

from __future__ import annotations

import torch

from sfc.train.optim import RepeatedSGD


def ForeachRepeatedSGD(params, lr, momentum=0.9, weight_decay=5e-4):  # noqa: N802
    """`RepeatedSGD` forced onto its multi-tensor path (the default on CUDA)."""
    return RepeatedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       foreach=True)


def use_foreach_sgd(stage) -> None:
    """Swap a fresh stage's `RepeatedSGD` for the foreach version (same groups, empty state)."""
    opt = stage.optimizer
    if not isinstance(opt, RepeatedSGD) or any(opt.state.values()):
        raise ValueError("use_foreach_sgd needs a fresh RepeatedSGD (before the first step)")
    groups = [dict(g) for g in opt.param_groups]
    d = opt.defaults
    stage.optimizer = ForeachRepeatedSGD(groups, lr=d["lr"], momentum=d["momentum"],
                                         weight_decay=d["weight_decay"])


def check_exact(device: str = "cpu", steps: int = 3) -> None:
    """Raise AssertionError unless `ForeachRepeatedSGD` equals `RepeatedSGD` bit for bit on a
    tiny multi-level DeepLab-v2 with the release's repeat counts: a first step (no momentum
    buffers), later steps, and a parameter without gradient in the last step."""
    from sfc.models import DeepLabV2
    from sfc.train import optim

    torch.manual_seed(0)
    a = DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8).to(device)
    b = DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8).to(device)
    b.load_state_dict(a.state_dict())
    oa, ob = (RepeatedSGD(optim.segnet_param_groups(net, 2.5e-4, release=True), lr=2.5e-4,
                          momentum=0.9, weight_decay=5e-4, foreach=fe)
              for fe, net in ((False, a), (True, b)))
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for pa, pb in zip(a.parameters(), b.parameters()):
            if pa.requires_grad:
                grad = torch.randn(pa.shape, generator=g).to(device)
                pa.grad, pb.grad = grad.clone(), grad.clone()
        if step == steps - 1:
            a.layer6.conv2d_list[0].bias.grad = b.layer6.conv2d_list[0].bias.grad = None
        oa.step()
        ob.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), f"parameter {n} differs"
        if pa.requires_grad:
            assert torch.equal(oa.state[pa]["momentum_buffer"],
                               ob.state[pb]["momentum_buffer"]), f"momentum of {n} differs"


if __name__ == "__main__":  # python -m sfc.bench.fastopt [cpu|cuda]
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    check_exact(dev)
    print(f"ForeachRepeatedSGD == RepeatedSGD bit for bit on {dev}")
