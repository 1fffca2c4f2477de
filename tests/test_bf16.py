"""bf16 autocast computes the right thing where SFC is sensitive (issue 11, item 9): the warp's
sampling grid and the logits that the soft masks (scale 100) are made from. CPU autocast."""

import pytest
import torch
import torch.nn.functional as F

from sfc.models import Accel, DeepLabV2, warp

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


@pytest.fixture(scope="module")
def trained_segnet(tiny_data, tiny_runs, tmp_path_factory):
    """A SegNet trained 200 iterations on the synthetic source (not a random init)."""
    from conftest import TINY_TRAIN

    from sfc import train

    out = tmp_path_factory.mktemp("trained") / "segnet"
    assert train.main(["--stage", "segnet", "--data", str(tiny_data), "--out", str(out),
                       *TINY_TRAIN, "--imagenet-init", "none", "--iters", "200",
                       "--eval-every", "200", "--log-every", "100", "--progress", "none"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_sfc_gradient_of_a_trained_segnet_under_bf16(trained_segnet, tiny_data, tiny_runs):
    """The SFC stage-one gradient w.r.t. a trained SegNet's parameters, BatchNorm in train mode
    (as in the SFC stages), against float64: float32 keeps it; bf16 autocast loses most of it
    even with float32 heads (the soft masks at scale 100 amplify the features' rounding) —
    which is why the SFC stages run their SFC term in float32 under --amp bf16."""
    from sfc.bench.precision import _load, measure
    from sfc.data import CityscapesSeq

    segnet, classes = _load(trained_segnet, "segnet")
    fg, sfm = _load(tiny_runs["accel"], "flownet"), _load(tiny_runs["sfm"], "sfm")
    ds = CityscapesSeq(tiny_data / "Cityscapes", split="train", frames=2, size=(64, 32),
                       classes=classes)
    res = measure(segnet, fg, sfm, [ds[i] for i in range(2)])["summary"]
    assert res["float32"]["cosine_min"] >= 0.9999, res
    assert res["bf16 (float32 heads)"]["cosine_mean"] < 0.9, res  # measured 0.57 (3 clips)
    assert res["bf16 (bf16 heads)"]["cosine_mean"] < 0.9, res
    # TF32 convolutions (emulated; what CUDA runs by default): between the two
    tf32 = res["tf32 convolutions (emulated)"]["cosine_mean"]
    assert res["bf16 (float32 heads)"]["cosine_mean"] < tf32 < res["float32"]["cosine_min"], res


@pytest.mark.parametrize("precision,enabled", [("float32", False), ("autocast", True)])
def test_sfc_term_runs_in_float32_under_bf16(precision, enabled, tiny_data, tiny_runs,
                                             tmp_path):
    """--amp bf16 in an SFC stage: the source term under autocast, the SFC term's target
    forwards in float32 unless --sfc-precision autocast."""
    from conftest import TINY_TRAIN

    from sfc import train
    from sfc.train.stages import build_stage

    args = train.resolve(train.build_parser().parse_args(
        ["--stage", "segnet", "--data", str(tiny_data), "--out", str(tmp_path / "r"),
         *TINY_TRAIN, "--imagenet-init", "none", "--device", "cpu", "--amp", "bf16",
         "--sfc-weight", "0.005", "--flownet-ckpt", str(tiny_runs["accel"]),
         "--sfm-ckpt", str(tiny_runs["sfm"]), "--sfc-precision", precision]))
    stage = build_stage(args, torch.device("cpu"), log=lambda s: None)
    seen = []
    stage.nets["segnet"].register_forward_hook(
        lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    data = train.build_data(args)
    from torch.utils.data import default_collate

    src = default_collate([data.source[0]])
    tgt = default_collate([data.target[0]])
    from sfc.train.streams import to_device

    stage.train_mode()
    stage.train_step(to_device(src, torch.device("cpu")), to_device(tgt, torch.device("cpu")))
    assert seen[-3:] == [True, enabled, enabled]  # source t; target t-1, t


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


# ---- TF32, emulated (sfc.bench.precision) ----------------------------------------------------
def test_to_tf32_rounds_to_ten_mantissa_bits_by_hand():
    """TF32 keeps 10 mantissa bits: at 1.0 its unit is 2^-10; half a unit rounds away from
    zero (cvt.rna), less than half down; signs and exact values kept."""
    from sfc.bench.precision import to_tf32

    u = 2.0 ** -10
    x = torch.tensor([1 + u / 2, 1 + u / 2 - 2 ** -20, -(1 + u / 2), 1 + 3 * u, 3.0, 0.0, 1e30])
    want = torch.tensor([1 + u, 1.0, -(1 + u), 1 + 3 * u, 3.0, 0.0])
    got = to_tf32(x)
    assert torch.equal(got[:6], want)
    # toward zero: the dropped bits cut off (1 + u/2 → 1, −(1 + u/2) → −1)
    cut = to_tf32(x, "truncate")
    assert torch.equal(cut[:6], torch.tensor([1.0, 1.0, -1.0, 1 + 3 * u, 3.0, 0.0]))
    assert got[6] == pytest.approx(1e30, rel=2 ** -11)
    m = got.view(torch.int32) & 0x1FFF  # the 13 dropped bits are zero
    assert int(m.abs().sum()) == 0
    with pytest.raises(ValueError, match="float32"):
        to_tf32(x.double())
    with pytest.raises(ValueError, match="rounding must be one of"):
        to_tf32(x, "up")


def test_tf32_convolutions_round_operands_and_the_output_gradient():
    """Inside `tf32_convolutions` a convolution equals the float32 one on TF32-rounded input
    and weight, and its input and weight gradients equal the backward convolutions of the
    rounded output gradient with the rounded operands (`torch.nn.grad`)."""
    from sfc.bench.precision import tf32_convolutions, to_tf32

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 11, generator=g).requires_grad_()
    w = torch.randn(4, 3, 3, 3, generator=g).requires_grad_()
    go = torch.randn(2, 4, 9, 11, generator=g)
    with tf32_convolutions():
        y = F.conv2d(x, w, None, 1, 2, 2)
    y.backward(go)
    xr, wr, gr = to_tf32(x.detach()), to_tf32(w.detach()), to_tf32(go)
    torch.testing.assert_close(y, F.conv2d(xr, wr, None, 1, 2, 2), rtol=0, atol=0)
    gx = torch.nn.grad.conv2d_input(x.shape, wr, gr, 1, 2, 2)
    gw = torch.nn.grad.conv2d_weight(xr, w.shape, gr, 1, 2, 2)
    torch.testing.assert_close(x.grad, gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, gw, rtol=1e-6, atol=1e-5)
    plain = F.conv2d(x.detach(), w.detach(), None, 1, 2, 2)
    assert (plain - y.detach()).abs().max() > 1e-4  # the rounding shows


def test_the_log_names_tf32_for_the_sfc_term_on_cuda(monkeypatch):
    """The run's precision line: on CUDA with TF32 convolutions (PyTorch's default) an SFC
    stage says what TF32 does to its gradient; not without the SFC term, not with --tf32 off,
    not on the CPU."""
    from types import SimpleNamespace

    from sfc.train.engine import precision_line

    sfc, plain = SimpleNamespace(sfc_weight=0.005), SimpleNamespace(sfc_weight=0.0)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert "cosine ≈ 0.98" in precision_line(sfc, "cuda")
    assert "cosine" not in precision_line(plain, "cuda")
    assert "cosine" not in precision_line(sfc, "cpu")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    line = precision_line(sfc, "cuda")
    assert "TF32 convolutions off" in line and "cosine" not in line
