"""The DeepLab classifier's GEMM form (sfc.models.aspp_gemm) equals the nn.Conv2d form."""

import copy

import pytest
import torch

from sfc.models import DeepLabV2
from sfc.models.aspp_gemm import AsppSum, _taps, aspp_impl, get_aspp_impl, set_aspp_impl
from sfc.models.deeplab import ASPP_DILATIONS, ClassifierModule


def _params(m: ClassifierModule):
    return [t for c in m.conv2d_list for t in (c.weight, c.bias)]


def _run(m, x, go, mode):
    """Output and gradients (x, then every weight/bias) of one forward/backward in `mode`."""
    for t in [x, *_params(m)]:
        t.grad = None
    with aspp_impl(mode):
        y = m(x)
        y.backward(go)
    return y.detach(), [None if t.grad is None else t.grad.clone() for t in [x, *_params(m)]]


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item()


# (N, Cin, H, W): the ResNet-101 map at 256×128 input (16×32: dilation 18/24 rows fall wholly
# into the padding), a map larger than every dilation, odd sizes, a map smaller than dilation 6.
SHAPES = [(1, 64, 16, 32), (2, 16, 30, 50), (1, 8, 7, 13), (1, 8, 5, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_equals_conv_float64(shape, single_thread):
    m = ClassifierModule(shape[1], 5).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    go = torch.randn(shape[0], 5, *shape[2:], dtype=torch.float64)
    y_c, g_c = _run(m, x, go, "conv")
    y_g, g_g = _run(m, x, go, "gemm")
    assert _rel(y_c, y_g) < 1e-12
    for a, b in zip(g_c, g_g):
        assert _rel(a, b) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_gemm_equals_conv_float32(shape, single_thread):
    m = ClassifierModule(shape[1], 15)
    x = torch.randn(*shape, requires_grad=True)
    go = torch.randn(shape[0], 15, *shape[2:])
    y_c, g_c = _run(m, x, go, "conv")
    y_g, g_g = _run(m, x, go, "gemm")
    assert _rel(y_c, y_g) < 2e-6
    for a, b in zip(g_c, g_g):
        assert _rel(a, b) < 2e-6


def test_gradcheck(single_thread):
    m = ClassifierModule(3, 2).double()
    x = torch.randn(2, 3, 9, 26, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, *p: AsppSum.apply(x, ASPP_DILATIONS, *p), (x, *_params(m)))


def test_taps_skip_the_padding_only():
    # 16×32: d=18 and d=24 keep only their middle row (3 taps each); the centre is shared.
    taps = _taps(ASPP_DILATIONS, 16, 32)
    assert len(taps) == 1 + 8 + 8 + 2 + 2
    assert taps[0] == (-1, 1, 1, 0, 0)
    assert all(abs(dy) < 16 and abs(dx) < 32 for _, _, _, dy, dx in taps)
    assert len(_taps(ASPP_DILATIONS, 64, 128)) == 1 + 4 * 8  # faithful 1024×512: all taps


def test_gradient_only_where_needed(single_thread):
    """Frozen input (Accel's frozen backbones) or frozen classifier: only the needed grads."""
    m = ClassifierModule(8, 4)
    x = torch.randn(1, 8, 12, 20)
    go = torch.randn(1, 4, 12, 20)
    _, g_c = _run(m, x, go, "conv")
    _, g_g = _run(m, x, go, "gemm")
    assert g_g[0] is None
    for a, b in zip(g_c[1:], g_g[1:]):
        assert _rel(a, b) < 2e-6
    frozen = copy.deepcopy(m).requires_grad_(False)
    xg = x.clone().requires_grad_()
    _, g_c = _run(frozen, xg, go, "conv")
    _, g_g = _run(frozen, xg, go, "gemm")
    assert all(g is None for g in g_g[1:])
    assert _rel(g_c[0], g_g[0]) < 2e-6


def test_channels_last_input(single_thread):
    m = ClassifierModule(16, 5)
    x = torch.randn(1, 16, 16, 32)
    go = torch.randn(1, 5, 16, 32)
    y_c, g_c = _run(m, x.clone().requires_grad_(), go, "conv")
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y_g, g_g = _run(m, xc, go, "gemm")
    assert g_g[0].is_contiguous(memory_format=torch.channels_last)
    assert _rel(y_c, y_g) < 2e-6
    for a, b in zip(g_c, g_g):
        assert _rel(a, b) < 2e-6


def test_which_form_runs(single_thread):
    """auto: GEMM for CPU training; nn.Conv2d under no_grad (evaluation), in "conv" mode and
    under autocast — those outputs are bit-identical to the plain convolutions."""
    assert get_aspp_impl() == "auto"
    m = ClassifierModule(8, 3)
    x = torch.randn(1, 8, 10, 14)
    y = m(x)
    assert y.grad_fn is not None and "AsppSum" in type(y.grad_fn).__name__

    def plain():
        out = m.conv2d_list[0](x)
        for conv in m.conv2d_list[1:]:
            out = out + conv(x)
        return out

    with torch.no_grad():
        assert torch.equal(m(x), plain())
    with aspp_impl("conv"):
        y = m(x)
        assert "AsppSum" not in type(y.grad_fn).__name__
        assert torch.equal(y, plain())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "AsppSum" not in type(m(x).grad_fn).__name__
    assert get_aspp_impl() == "auto"
    with pytest.raises(ValueError, match="auto"):
        set_aspp_impl("fast")


def test_deeplab_training_step_matches_conv_form(small_backbone, single_thread):
    """A whole DeepLab-v2 train-mode forward/backward: logits and every parameter gradient of
    the two forms agree to float32 rounding; BN running statistics are identical."""
    torch.manual_seed(1)
    a = DeepLabV2(15, multi_level=True, **small_backbone).train()
    b = copy.deepcopy(a)
    x = torch.randn(1, 3, 129, 257) * 50
    outs = []
    for net, mode in ((a, "conv"), (b, "gemm")):
        with aspp_impl(mode):
            main, aux = net(x)
            (main.square().mean() + 0.1 * aux.square().mean()).backward()
        outs.append((main.detach(), aux.detach()))
    for o_c, o_g in zip(*outs):
        assert _rel(o_c, o_g) < 1e-5
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            assert _rel(p.grad, q.grad) < 1e-4, name
    for (name, s), t in zip(a.state_dict().items(), b.state_dict().values()):
        if "running" in name or "num_batches" in name:
            assert torch.equal(s, t), name


def test_features_moves_bn_statistics_as_forward(small_backbone, single_thread):
    """SFC stage one's unused source forward runs only `features` (quirk 7): same BN
    running statistics as the full forward, exactly."""
    a = DeepLabV2(15, multi_level=True, **small_backbone).train()
    b = copy.deepcopy(a)
    x = torch.randn(1, 3, 65, 97) * 50
    with torch.no_grad():
        a(x)
        b.features(x)
    for (name, s), t in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(s, t), name
    x3, x4 = b.features(x)
    assert x3.shape == (1, 16 * 8, 9, 13) and x4.shape == (1, 32 * 8, 9, 13)
