"""The release's optimisers and LR rules (method §3.1, §5, quirks 3 and 11)."""

import copy
import math
import warnings

import pytest
import torch

from sfc.models import Accel, DeepLabV2
from sfc.train import optim


def _release_duplicated_list(net):
    """The release's 1x-LR helper, re-written here: walk (conv1, bn1, layer1..4).modules() and
    yield every module's recursive parameters that require grad."""
    out = []
    for b in (net.conv1, net.bn1, net.layer1, net.layer2, net.layer3, net.layer4):
        for j in b.modules():
            out += [k for k in j.parameters() if k.requires_grad]
    return out


def test_release_repeat_counts_resnet101():
    with torch.device("meta"):
        net = DeepLabV2(15, multi_level=True)
    groups = optim.segnet_param_groups(net, 2.5e-4, release=True)
    reps = groups[0]["repeats"]
    assert len(reps) == 310 and sum(reps) == 940
    assert sorted(set(reps)) == [1, 3, 4]
    assert reps.count(3) == 297 and reps.count(4) == 12 and reps.count(1) == 1
    assert sum(reps) == len(_release_duplicated_list(net))
    clean = optim.segnet_param_groups(net, 2.5e-4, release=False)
    assert clean[0]["repeats"] == [1] * 310


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
@pytest.mark.parametrize("lrs", [(2.5e-4, 2.4e-4, 2.3e-4, 2.2e-4)])
def test_repeated_sgd_equals_torch_sgd_with_duplicated_list(small_backbone, lrs, foreach):
    torch.manual_seed(0)
    net = DeepLabV2(15, multi_level=True, **small_backbone)
    ref = copy.deepcopy(net)
    ours = optim.make_sgd(optim.segnet_param_groups(net, lrs[0], release=True), lrs[0],
                          foreach=foreach)
    dup = _release_duplicated_list(ref)
    heads = ref.classifier_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns about the duplicates: that is the point
        theirs = torch.optim.SGD([{"params": dup, "lr": lrs[0]},
                                  {"params": heads, "lr": 10 * lrs[0]}], lr=lrs[0],
                                 momentum=0.9, weight_decay=5e-4, foreach=False)
    p_ours = [p for g in ours.param_groups for p in g["params"]]
    p_theirs = ref.backbone_parameters() + heads
    assert [tuple(p.shape) for p in p_ours] == [tuple(p.shape) for p in p_theirs]
    assert any(k > 1 for k in ours.param_groups[0]["repeats"])
    start = [p.detach().clone() for p in p_ours]
    for step, lr in enumerate(lrs):  # step 0 has no momentum buffer yet
        optim.set_lr(ours, lr)
        theirs.param_groups[0]["lr"], theirs.param_groups[1]["lr"] = lr, 10 * lr
        for p, q, g in zip(p_ours, p_theirs, _grads(p_ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        for p, q in zip(p_ours, p_theirs):
            torch.testing.assert_close(p, q, rtol=0, atol=0)  # bit-exact
    moved = [(p - s).abs().max().item() for p, s in zip(p_ours, start)]
    assert min(moved) > 0


@pytest.mark.parametrize("foreach", [False, True], ids=["single-tensor", "foreach"])
def test_repeated_sgd_first_and_second_step_by_hand(foreach):
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = optim.RepeatedSGD([{"params": [p], "repeats": [3]}], lr=0.1, momentum=0.9,
                            weight_decay=0.5, foreach=foreach)
    g, lr, m, wd = 2.0, 0.1, 0.9, 0.5
    x = 1.0
    p.grad = torch.tensor([g], dtype=torch.float64)
    opt.step()
    for _ in range(3):  # first step: d = g + wd·x; x -= lr·d; buffer = last d
        d = g + wd * x
        x -= lr * d
    buf = d
    assert math.isclose(p.item(), x, rel_tol=0, abs_tol=1e-12)
    assert math.isclose(opt.state[p]["momentum_buffer"].item(), buf, abs_tol=1e-12)
    opt.step()
    for _ in range(3):  # later: B = m·B + (g + wd·x); x -= lr·B
        buf = m * buf + g + wd * x
        x -= lr * buf
    assert math.isclose(p.item(), x, rel_tol=0, abs_tol=1e-12)


def test_clean_optimizer_is_plain_sgd():
    torch.manual_seed(1)
    a = torch.nn.Linear(4, 3)
    b = copy.deepcopy(a)
    ours = optim.make_sgd([{"params": list(a.parameters())}], lr=0.01)
    theirs = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                             foreach=False)
    for s in range(3):
        for p, q, g in zip(a.parameters(), b.parameters(), _grads(list(a.parameters()), s)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_repeated_sgd_state_dict_roundtrip():
    p = torch.nn.Parameter(torch.ones(2))
    opt = optim.RepeatedSGD([{"params": [p], "repeats": [3], "lr_mult": 10.0}], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = optim.RepeatedSGD([{"params": [q], "repeats": [3], "lr_mult": 10.0}], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["repeats"] == [3]
    torch.testing.assert_close(opt2.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    with pytest.raises(ValueError, match="repeat count"):
        optim.RepeatedSGD([{"params": [p], "repeats": [1, 2]}], lr=0.1)


# ---- LR rules against the release's loops ---------------------------------------------------
def test_poly_lr_release_formula():
    for i in (0, 1, 40000, 79999):
        assert optim.poly_lr(i, 2.5e-4, 80000) == 2.5e-4 * (1 - i / 80000) ** 0.9
    assert optim.poly_lr(0, 2.5e-4, 120000) == 2.5e-4
    assert math.isclose(optim.poly_lr(60000, 2.5e-4, 120000), 2.5e-4 * 0.5 ** 0.9)


def _release_after_step_lrs(n):
    """FlowNet_pretrain stage two: optimiser built at 5e-4; after step i the release sets
    5e-5 while i < 1000, else 5e-4. Returns the LR each step ran at."""
    lr, used = 5e-4, []
    for i in range(n):
        used.append(lr)
        lr = 5e-5 if i < 1000 else 5e-4
    return used


def _release_before_step_lrs(n):
    """SFC stage two: before step i the release sets 5e-5 while i < 1000, else 5e-4."""
    return [5e-5 if i < 1000 else 5e-4 for i in range(n)]


def test_stage_two_lr_orderings():
    after = [optim.flownet_pretrain_stage_two_lr(i) for i in range(2500)]
    assert after == _release_after_step_lrs(2500)
    # 1-based: iteration 1 at 5e-4, 2-1001 at 5e-5, then 5e-4
    assert after[0] == 5e-4 and set(after[1:1001]) == {5e-5} and set(after[1001:]) == {5e-4}
    before = [optim.sfc_stage_two_lr(i) for i in range(2500)]
    assert before == _release_before_step_lrs(2500)
    assert set(before[:1000]) == {5e-5} and set(before[1000:]) == {5e-4}


def test_set_lr_keeps_heads_at_10x(small_backbone):
    net = DeepLabV2(15, multi_level=True, **small_backbone)
    opt = optim.make_sgd(optim.segnet_param_groups(net, 2.5e-4, release=True), 2.5e-4)
    optim.set_lr(opt, optim.poly_lr(100, 2.5e-4, 80000))
    lr = 2.5e-4 * (1 - 100 / 80000) ** 0.9
    assert opt.param_groups[0]["lr"] == lr
    assert math.isclose(opt.param_groups[1]["lr"], 10 * lr)
    heads = {id(p) for m in (net.layer5, net.layer6) for p in m.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == heads
    back = {id(p) for p in opt.param_groups[0]["params"]}
    assert not back & heads and id(net.conv1.weight) in back
    assert not {id(p) for p in net.bn1.parameters()} & back  # stem BN frozen


def test_accel_one_group_exactly_merge_flownet_layer6(small_backbone):
    accel = Accel(15, **small_backbone)
    optim.freeze_accel_backbones(accel)
    groups = optim.accel_param_groups(accel, 5e-4)
    assert len(groups) == 1 and groups[0]["lr"] == 5e-4 and groups[0]["lr_mult"] == 1.0
    want = {n for n, _ in accel.named_parameters()
            if n.split(".")[0] in ("merge", "flownet")
            or n.startswith(("net_ref.layer6.", "net_update.layer6."))}
    names = {id(p): n for n, p in accel.named_parameters()}
    assert {names[id(p)] for p in groups[0]["params"]} == want
    assert len(groups[0]["params"]) == len(want)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in accel.trainable_parameters()}
    for n, p in accel.named_parameters():
        assert p.requires_grad == (n in want), n


def test_adam_is_l2_not_adamw():
    p = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = optim.make_adam([p], lr=1e-4, weight_decay=4e-4)
    assert type(opt) is torch.optim.Adam and not opt.param_groups[0].get("decoupled_weight_decay")
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    g = 0.5 + 4e-4 * 2.0  # L2: the decay joins the gradient before the moments
    m_hat = (0.1 * g) / (1 - 0.9)
    v_hat = (0.001 * g * g) / (1 - 0.999)
    expect = 2.0 - 1e-4 * m_hat / (math.sqrt(v_hat) + 1e-8)
    assert math.isclose(p.item(), expect, rel_tol=0, abs_tol=1e-12)
    assert opt.param_groups[0]["lr"] == 1e-4 and optim.constant_lr(5000, 1e-4) == 1e-4
