"""warp (method §3.3) against a per-pixel clamped-corner reference, gradients, and Accel (§3.4)."""

import inspect
import math

import pytest
import torch

from sfc.models import Accel, DeepLabV2, FlowNetS, warp
from sfc.models.deeplab import upsample_like

pytestmark = pytest.mark.usefixtures("single_thread")


def _ref_warp(x, flow):
    """The release's rule, pixel by pixel: bilinear at (j+u, i+v), each corner index clamped."""
    b, c, h, w = x.shape
    out = torch.zeros_like(x)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                px = j + flow[n, 0, i, j].item()
                py = i + flow[n, 1, i, j].item()
                x0, y0 = math.floor(px), math.floor(py)
                ax, ay = px - x0, py - y0
                for yy, wy in ((y0, 1 - ay), (y0 + 1, ay)):
                    for xx, wx in ((x0, 1 - ax), (x0 + 1, ax)):
                        yc, xc = min(max(yy, 0), h - 1), min(max(xx, 0), w - 1)
                        out[n, :, i, j] += wy * wx * x[n, :, yc, xc]
    return out


def test_warp_matches_clamped_corner_reference():
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    flow = torch.randn(2, 2, 5, 7, dtype=torch.float64) * 3.0  # many samples leave the image
    flow[0, 0, 0, 0], flow[0, 1, 0, 0] = -10.5, 2.25  # far left
    flow[1, 0, 4, 6], flow[1, 1, 4, 6] = 0.5, 20.0  # far below
    flow[1, :, 2, 3] = torch.tensor([1.0, -1.0], dtype=torch.float64)  # integer shift
    assert ((flow[:, 0] + torch.arange(7) < 0) | (flow[:, 0] + torch.arange(7) > 6)).any()
    torch.testing.assert_close(warp(x, flow), _ref_warp(x, flow), rtol=1e-12, atol=1e-12)


def test_warp_identity_and_shift():
    x = torch.randn(1, 2, 4, 6)
    torch.testing.assert_close(warp(x, torch.zeros(1, 2, 4, 6)), x, rtol=1e-6, atol=1e-6)
    flow = torch.zeros(1, 2, 4, 6)
    flow[:, 0] = 1.0  # sample one pixel to the right; last column clamps (border)
    out = warp(x, flow)
    torch.testing.assert_close(out[..., :-1], x[..., 1:])
    torch.testing.assert_close(out[..., -1], x[..., -1])


def test_warp_gradcheck_both_arguments():
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    # keep sample points away from integer coordinates (bilinear kinks) and the border
    flow = (torch.rand(1, 2, 4, 5, dtype=torch.float64) * 0.8 + 0.1) * torch.tensor(
        [1.0, -1.0], dtype=torch.float64).view(1, 2, 1, 1)
    flow[:, :, 1:3, 1:4] += 0.5
    flow.requires_grad_(True)
    assert torch.autograd.gradcheck(warp, (x, flow))


def test_warp_errors():
    with pytest.raises(ValueError, match="same batch and spatial size"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="B×2×H×W"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))


# ---- Accel -------------------------------------------------------------------------------------
def test_accel_keys(small_backbone):
    a = Accel(num_classes=15, **small_backbone)
    sd = a.state_dict()
    assert {k.split(".", 1)[0] for k in sd} == {"net_ref", "net_update", "merge", "flownet"}
    assert tuple(sd["merge.weight"].shape) == (15, 30, 1, 1)
    assert torch.equal(sd["merge.bias"], torch.zeros(15))
    assert "net_ref.layer6.conv2d_list.3.bias" in sd and "flownet.conv1.0.weight" in sd
    assert not any(".layer5." in k for k in sd)
    # xavier-normal: std = sqrt(2 / (fan_in + fan_out)) = sqrt(2 / 45)
    assert Accel(num_classes=100, **small_backbone).merge.weight.std().item() == pytest.approx(
        math.sqrt(2 / 300), rel=0.05)
    assert len(a.trainable_parameters()) == 2 + 2 * 23 + 2 * 8


def test_accel_default_is_resnet101(small_backbone):
    defaults = {k: v.default for k, v in inspect.signature(Accel).parameters.items()}
    assert defaults == {"num_classes": 15, "layers": (3, 4, 23, 3), "width": 64}
    sd = Accel(**small_backbone).state_dict()
    ref = DeepLabV2(**small_backbone).state_dict()
    fl = FlowNetS().state_dict()
    for sub, keys in (("net_ref", ref), ("net_update", ref), ("flownet", fl)):
        assert {k for k in sd if k.startswith(sub + ".")} == {f"{sub}.{k}" for k in keys}


@pytest.mark.parametrize("frames,size", [(2, (64, 96)), (3, (48, 80)), (2, (65, 97))])
def test_accel_forward_matches_composition(small_backbone, frames, size):
    a = Accel(num_classes=5, **small_backbone).eval()
    seg = torch.randn(2, 3, frames, *size)
    flo = torch.rand(2, 3, frames, *size)
    with torch.no_grad():
        out = a(seg, flo)
        grid = ((size[0] + 3) // 4, (size[1] + 3) // 4)
        ref = upsample_like(a.net_ref(seg[:, :, 0]), grid)
        for i in range(frames - 1):
            ref = warp(ref, a.flownet(torch.cat((flo[:, :, i + 1], flo[:, :, i]), 1)))
        upd = upsample_like(a.net_update(seg[:, :, -1]), grid)
        exp = upsample_like(a.merge(torch.cat((ref, upd), 1)), size)
    assert out.shape == (2, 5, *size)
    torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)
    if size[0] % 8 == 0 and size[1] % 8 == 0:  # the release's ×2 / ×4 scale factors agree
        x = torch.nn.functional.interpolate(a.net_update(seg[:, :, -1]), scale_factor=2,
                                            mode="bilinear", align_corners=False)
        torch.testing.assert_close(x, upd)


def test_accel_errors(small_backbone):
    a = Accel(num_classes=3, **small_backbone)
    with pytest.raises(ValueError, match="B×3×T×H×W"):
        a(torch.zeros(1, 3, 2, 16, 16), torch.zeros(1, 3, 3, 16, 16))


def test_accel_bf16_autocast_runs_and_stays_close(small_backbone):
    a = Accel(num_classes=5, **small_backbone).eval()
    seg, flo = torch.randn(1, 3, 2, 32, 48), torch.rand(1, 3, 2, 32, 48)
    with torch.no_grad():
        ref = a(seg, flo)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = a(seg, flo)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err
