"""bf16 autocast computes the right thing where SFC is sensitive (issue 11, item 9): the warp's
sampling grid and the logits that the soft masks (scale 100) are made from. CPU autocast."""

import pytest
import torch
import torch.nn.functional as F

from sfc import losses
from sfc.models import Accel, DeepLabV2, FlowNetS, warp

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _smooth_flow(h, w, px=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 2, 12, 20, generator=g) * px
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _bf16_grid_warp(x, flow):
    """The sampling grid built in the flow's dtype (how warp worked before the fix)."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, dtype=flow.dtype).view(1, h, 1)
    xs = torch.arange(w, dtype=flow.dtype).view(1, 1, w)
    gx = (xs + flow[:, 0]) * (2.0 / (w - 1)) - 1.0
    gy = (ys + flow[:, 1]) * (2.0 / (h - 1)) - 1.0
    grid = torch.stack((gx, gy), dim=3).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def test_warp_of_a_wide_grid_with_a_bf16_flow():
    x = torch.randn(1, 16, 180, 320, generator=torch.Generator().manual_seed(1))  # unit var
    flow = _smooth_flow(180, 320)
    ref = warp(x, flow)
    err = (warp(x, flow.bfloat16()) - ref).abs().mean().item()
    assert err <= 0.02, err  # only the flow's own bf16 rounding remains (~0.004)
    # the grid in bf16 rounds pixel positions above 256 by up to 2 pixels: ~0.3
    assert (_bf16_grid_warp(x, flow.bfloat16()) - ref).abs().mean().item() > 0.1


def test_warp_returns_the_input_dtype_under_autocast():
    x = torch.randn(1, 4, 20, 300).bfloat16()
    flow = _smooth_flow(20, 300).bfloat16()
    with torch.autocast(**BF16):
        out = warp(x, flow)
    assert out.dtype == torch.bfloat16
    want = warp(x.float(), flow.float())  # same math in float32, then rounded once
    assert torch.equal(out, want.bfloat16())


def _sfc_logit_grads(net, fg, sfm, amp: bool):
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 2, 64, 128, generator=g)  # flow-normalised frames t-1, t
    seg = img * 255 - 110
    ctx = torch.autocast(**BF16) if amp else torch.autocast("cpu", enabled=False)
    with ctx:
        lp, lc = net(seg[:, :, 0]), net(seg[:, :, 1])
        for t in (*lp, *lc):
            t.retain_grad()
        loss = losses.sfc_loss(lp, lc, img[:, :, 0], img[:, :, 1], fg, sfm)
    loss.backward()
    return torch.cat([t.grad.float().flatten() for t in (*lp, *lc)])


@pytest.mark.usefixtures("single_thread")
def test_sfc_stage_one_gradient_under_bf16_matches_float32():
    """Logits of realistic size (~12) whose class margins are a few hundredths — where the SFC
    gradient lives: rounded to bf16 (resolution 0.06 at 12) they lose the margins."""
    net = DeepLabV2(15, multi_level=True, layers=(1, 1, 1, 1), width=8).eval()
    with torch.no_grad():
        for head in (net.layer6, net.layer5):
            for conv in head.conv2d_list:
                conv.bias.add_(3.0)  # four branches summed: +12 on every class
    fg, sfm = FlowNetS().eval(), FlowNetS().eval()
    g32 = _sfc_logit_grads(net, fg, sfm, amp=False)
    net.fp32_heads = True  # what the SFC stages set
    cos = F.cosine_similarity(_sfc_logit_grads(net, fg, sfm, amp=True), g32, dim=0).item()
    assert cos >= 0.98, cos
    net.fp32_heads = False  # heads in bf16, as before the fix
    cos_bf16 = F.cosine_similarity(_sfc_logit_grads(net, fg, sfm, amp=True), g32, dim=0).item()
    assert cos_bf16 < 0.5, cos_bf16


def test_fp32_heads_give_float32_logits_under_autocast(small_backbone):
    net = DeepLabV2(15, multi_level=True, **small_backbone).eval()
    accel = Accel(15, **small_backbone).eval()
    x = torch.rand(1, 3, 2, 32, 64)
    with torch.no_grad(), torch.autocast(**BF16):
        assert net(x[:, :, 0])[0].dtype == torch.bfloat16  # default: autocast's choice
        assert accel(x, x).dtype == torch.bfloat16
        net.fp32_heads = accel.fp32_heads = True
        assert [t.dtype for t in net(x[:, :, 0])] == [torch.float32] * 2
        assert accel(x, x).dtype == torch.float32
    assert accel.net_ref.fp32_heads and accel.net_update.fp32_heads
    with torch.no_grad():  # without autocast the flag changes nothing
        net.fp32_heads = True
        a = net(x[:, :, 0])[0]
        net.fp32_heads = False
        assert torch.equal(a, net(x[:, :, 0])[0])
