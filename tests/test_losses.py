"""Losses (method §4) against plain loops written here, frozen-net behaviour, dtypes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from sfc.losses import (
    accel_sfc_loss,
    epe,
    seg_loss,
    segmentation_based_flow,
    sfc_loss,
    sfm_loss,
    soft_masks,
)
from sfc.models import Accel, FlowNetS

pytestmark = pytest.mark.usefixtures("single_thread")

H, W = 16, 24  # image size of the loss tests; flow grid 4×6
# float32 keeps the FlowNetS calls fast on CPU; batched and looped results then agree to
# float32 rounding (gradcheck below runs in float64).
DT = torch.float32
TOL = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def nets():
    """(flownet_global, sfm), different weights, biases non-zero (SFM(0) ≠ 0)."""
    torch.manual_seed(1)
    return FlowNetS().eval(), FlowNetS().eval()


def _loop_sf(m_prev, m_cur, i_prev, i_cur, sfm, present=None):
    """The release's class loop: one SFM call per (sample, class), absent classes skipped."""
    out = []
    for b in range(m_cur.shape[0]):
        acc = 0
        for c in range(m_cur.shape[1]):
            if present is not None and not present[b, c]:
                continue
            x = torch.cat((i_cur[b:b + 1] * m_cur[b:b + 1, c:c + 1],
                           i_prev[b:b + 1] * m_prev[b:b + 1, c:c + 1]), 1)
            acc = acc + sfm(x)
        out.append(acc if torch.is_tensor(acc) else torch.zeros(1, 2, H // 4, W // 4, dtype=DT))
    return torch.cat(out, 0)


def _epe_loop(a, b, gt=None):
    tot, n = 0.0, 0
    for i in range(a.shape[0]):
        for y in range(a.shape[2]):
            for x in range(a.shape[3]):
                if gt is not None and gt[i, y, x] == -1:
                    continue
                d = a[i, :, y, x] - b[i, :, y, x]
                tot += float((d[0] ** 2 + d[1] ** 2) ** 0.5)
                n += 1
    return tot / n


def test_epe_values():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    target[0, 0, 0, 0], target[0, 1, 0, 0] = 3.0, 4.0  # 5 px
    target[0, 0, 1, 1] = -1.0  # 1 px
    assert epe(pred, target).item() == pytest.approx(6 / 4)
    gt = torch.tensor([[[-1, 2], [0, 1]]])
    assert epe(pred, target, gt=gt).item() == pytest.approx(1 / 3)
    a, b = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    gt = torch.randint(-1, 3, (2, 3, 4))
    assert epe(a, b, gt=gt).item() == pytest.approx(_epe_loop(a, b, gt), rel=1e-5)
    assert epe(a, b, gt=torch.full((2, 3, 4), -1)).item() == 0.0
    with pytest.raises(ValueError, match="flow grid"):
        epe(a, b, gt=torch.zeros(2, 4, 4))


def test_seg_loss_values():
    logits = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    gt = torch.randint(-1, 4, (2, 9, 13))
    gt[0, 0, 0] = -1
    up = F.interpolate(logits, size=(9, 13), mode="bilinear", align_corners=False)
    tot, n = 0.0, 0
    for b in range(2):
        for y in range(9):
            for x in range(13):
                if gt[b, y, x] >= 0:
                    tot -= torch.log_softmax(up[b, :, y, x], dim=0)[gt[b, y, x]].item()
                    n += 1
    assert seg_loss(logits, gt).item() == pytest.approx(tot / n, rel=1e-10)
    aux = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    assert seg_loss((logits, aux), gt).item() == pytest.approx(
        tot / n + 0.1 * seg_loss(aux, gt).item(), rel=1e-10)
    empty = seg_loss(logits.requires_grad_(), torch.full((2, 9, 13), -1))
    assert empty.item() == 0.0 and empty.requires_grad


def test_soft_masks():
    logits = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    m = soft_masks(logits, (H, W), scale=100.0)
    up = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m, torch.softmax(100 * up, dim=1))
    torch.testing.assert_close(m.sum(1), torch.ones(1, H, W, dtype=torch.float64))


@pytest.mark.parametrize("b", [1, 2])
def test_sf_batched_equals_loop(nets, b):
    _, sfm = nets
    m_prev = torch.softmax(torch.randn(b, 5, H, W, dtype=DT), dim=1)
    m_cur = torch.softmax(torch.randn(b, 5, H, W, dtype=DT), dim=1)
    i_prev, i_cur = torch.rand(2, b, 3, H, W, dtype=DT)
    with torch.no_grad():
        sf = segmentation_based_flow(m_prev, m_cur, i_prev, i_cur, sfm)
        torch.testing.assert_close(sf, _loop_sf(m_prev, m_cur, i_prev, i_cur, sfm), **TOL)
        present = torch.rand(b, 5) > 0.5
        present[0, :] = torch.tensor([True, False, True, False, False])
        if b == 2:
            present[1] = False  # a sample with no class: SF = 0
        sfp = segmentation_based_flow(m_prev, m_cur, i_prev, i_cur, sfm, present=present)
        torch.testing.assert_close(sfp, _loop_sf(m_prev, m_cur, i_prev, i_cur, sfm, present),
                                   **TOL)
        # absent classes must contribute exactly nothing although SFM(0) ≠ 0
        assert sfm(torch.zeros(1, 6, H, W, dtype=DT)).abs().max() > 1e-4
        assert not torch.allclose(sfp[:1], sf[:1])


@pytest.mark.parametrize("multi", [False, True])
def test_sfc_loss_equals_loop_and_grads(nets, multi):
    flownet_global, sfm = nets
    for p in list(flownet_global.parameters()) + list(sfm.parameters()):
        p.requires_grad_(True)  # the loss must keep them gradient-free on its own
    lp = [torch.randn(2, 4, 2, 3, dtype=DT, requires_grad=True) for _ in range(2)]
    lc = [torch.randn(2, 4, 2, 3, dtype=DT, requires_grad=True) for _ in range(2)]
    i_prev, i_cur = torch.rand(2, 2, 3, H, W, dtype=DT)
    args_p = (lp[0], lp[1]) if multi else lp[0]
    args_c = (lc[0], lc[1]) if multi else lc[0]
    loss = sfc_loss(args_p, args_c, i_prev, i_cur, flownet_global, sfm, scale=100.0)
    loss.backward()
    assert all(p.grad is None for p in sfm.parameters())
    assert all(p.grad is None for p in flownet_global.parameters())
    got = [None if t.grad is None else t.grad.clone() for t in lp + lc]

    # plain loop: OF detached, SF per class per sample, EPE main + 0.1 aux
    sfm.requires_grad_(False)  # (only the logits' gradients are compared)
    of = flownet_global(torch.cat((i_cur, i_prev), 1)).detach()
    ref = 0
    for k, w in ((0, 1.0), (1, 0.1)) if multi else ((0, 1.0),):
        sf = _loop_sf(soft_masks(lp[k], (H, W)), soft_masks(lc[k], (H, W)), i_prev, i_cur, sfm)
        ref = ref + w * torch.norm(sf - of, p=2, dim=1).mean()
    for t in lp + lc:
        t.grad = None
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    for g, t in zip(got, lp + lc):
        if multi or t is lp[0] or t is lc[0]:
            assert g.abs().max() > 0
            torch.testing.assert_close(g, t.grad, **TOL)
        else:
            assert g is None


def test_global_flow_runs_without_grad(nets):
    flownet_global, sfm = nets
    seen = []
    h = flownet_global.register_forward_hook(lambda *a: seen.append(torch.is_grad_enabled()))
    logits = torch.randn(1, 3, 2, 3, dtype=DT, requires_grad=True)
    imgs = torch.rand(2, 1, 3, H, W, dtype=DT)
    sfc_loss(logits, logits, imgs[0], imgs[1], flownet_global, sfm).backward()
    h.remove()
    assert seen == [False] and logits.grad is not None


def test_sfc_loss_gradcheck_float64(nets):
    flownet_global, sfm = (copy.deepcopy(n).double() for n in nets)
    imgs = torch.rand(2, 1, 3, 8, 8, dtype=torch.float64)
    logits = torch.randn(1, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    fixed = torch.randn(1, 3, 1, 2, dtype=torch.float64)
    out = sfc_loss(fixed, logits, imgs[0], imgs[1], flownet_global, sfm, scale=1.0)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda lg: sfc_loss(fixed, lg, imgs[0], imgs[1], flownet_global, sfm, scale=1.0),
        (logits,))


def test_sfm_loss_equals_loop(nets):
    flownet_global, sfm = nets
    sfm.zero_grad(set_to_none=True)
    for p in sfm.parameters():
        p.requires_grad_(True)
    i_prev, i_cur = torch.rand(2, 2, 3, H, W, dtype=DT)
    gt_prev = torch.randint(-1, 3, (2, H, W))
    gt_cur = torch.randint(-1, 3, (2, H, W))
    gt_cur[1][gt_cur[1] == 2] = 7  # class 7 only in sample 1's current label
    gt_prev[1][gt_prev[1] == 1] = -1  # class 1 absent from both labels of sample 1
    gt_cur[1][gt_cur[1] == 1] = -1
    gt_down = torch.randint(-1, 3, (2, H // 4, W // 4))
    loss = sfm_loss(i_prev, i_cur, gt_prev, gt_cur, flownet_global, sfm, gt_down4x=gt_down)
    loss.backward()
    assert all(p.grad is not None for p in sfm.parameters())  # the SFM trains here
    assert all(p.grad is None for p in flownet_global.parameters())
    g = sfm.predict_flow2.weight.grad.clone()
    sfm.zero_grad(set_to_none=True)

    n = 8
    mp = torch.stack([(gt_prev == c) for c in range(n)], 1).to(DT)
    mc = torch.stack([(gt_cur == c) for c in range(n)], 1).to(DT)
    present = (mp.sum((2, 3)) + mc.sum((2, 3))) > 0
    assert present[1, 7] and not present[0, 7] and not present[1, 1]
    sf = _loop_sf(mp, mc, i_prev, i_cur, sfm, present)
    of = flownet_global(torch.cat((i_cur, i_prev), 1)).detach()
    d = torch.norm(sf - of, p=2, dim=1)
    ref = d[gt_down != -1].mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(g, sfm.predict_flow2.weight.grad, **TOL)
    sfm.zero_grad(set_to_none=True)
    with torch.no_grad():
        unmasked = sfm_loss(i_prev, i_cur, gt_prev, gt_cur, flownet_global, sfm)
        # the dataset's class count instead of the largest label: the same loss, bit for bit
        given = sfm_loss(i_prev, i_cur, gt_prev, gt_cur, flownet_global, sfm, gt_down4x=gt_down,
                         num_classes=15)
    torch.testing.assert_close(unmasked, d.mean().detach(), **TOL)
    assert torch.equal(given, loss.detach())


def test_accel_sfc_loss_equals_manual(nets, small_backbone):
    flownet_global, sfm = nets
    accel = Accel(num_classes=4, **small_backbone).to(DT).eval()
    seg3 = torch.randn(1, 3, 3, H, W, dtype=DT)  # frames t-2, t-1, t
    flo3 = torch.rand(1, 3, 3, H, W, dtype=DT)
    loss = accel_sfc_loss(seg3[:, :, 1:], flo3[:, :, 1:], seg3[:, :, :2], flo3[:, :, :2], accel,
                          flownet_global, sfm, scale=100.0)
    loss.backward()
    grads = {n: p.grad for n, p in accel.named_parameters()}
    assert grads["merge.weight"].abs().max() > 0
    assert grads["flownet.conv1.0.weight"].abs().max() > 0  # through the warp's flow gradient
    assert grads["net_ref.layer6.conv2d_list.0.weight"].abs().max() > 0
    assert all(p.grad is None for p in sfm.parameters())
    with torch.no_grad():
        lc = accel(seg3[:, :, 1:], flo3[:, :, 1:])
        lp = accel(seg3[:, :, :2], flo3[:, :, :2])
        i_prev, i_cur = flo3[:, :, 1], flo3[:, :, 2]
        sf = _loop_sf(soft_masks(lp, (H, W)), soft_masks(lc, (H, W)), i_prev, i_cur, sfm)
        of = flownet_global(torch.cat((i_cur, i_prev), 1))
        ref = torch.norm(sf - of, p=2, dim=1).mean()
    torch.testing.assert_close(loss, ref, **TOL)


def test_num_classes_from_logits(nets):
    flownet_global, sfm = nets
    for c in (2, 12):
        logits = torch.randn(1, c, 2, 3, dtype=DT)
        imgs = torch.rand(2, 1, 3, H, W, dtype=DT)
        with torch.no_grad():
            loss = sfc_loss(logits, logits, imgs[0], imgs[1], flownet_global, sfm)
            sf = _loop_sf(soft_masks(logits, (H, W)), soft_masks(logits, (H, W)), imgs[0],
                          imgs[1], sfm)
            of = flownet_global(torch.cat((imgs[1], imgs[0]), 1))
        torch.testing.assert_close(loss, torch.norm(sf - of, p=2, dim=1).mean(), **TOL)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(2)
    fg, sfm = FlowNetS().eval(), FlowNetS().eval()
    logits = torch.randn(1, 4, 2, 3, requires_grad=True)
    imgs = torch.rand(2, 1, 3, H, W)
    ref = sfc_loss(logits, logits * 0.5, imgs[0], imgs[1], fg, sfm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sfc_loss(logits, logits * 0.5, imgs[0], imgs[1], fg, sfm)
    assert low.dtype == torch.float32
    low.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() > 0
    assert low.item() == pytest.approx(ref.item(), rel=0.05)
