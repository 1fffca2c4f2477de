"""DeepLabV2 and FlowNetS: release keys/shapes, counts, output sizes, and a functional reference
forward written from method §3.1/§3.2 (independent of the modules' code)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sfc.models import DeepLabV2, FlowNetS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def resnet101():
    torch.manual_seed(0)
    return DeepLabV2()


# ---- DeepLabV2 ---------------------------------------------------------------------------------
def test_resnet101_keys_and_shapes(resnet101):
    sd = resnet101.state_dict()
    # 104 convs without bias + 104 BNs × 5 entries + 4 classifier convs × 2 = 632 keys
    assert len(sd) == 632
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.bias": (256,),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer3.22.conv2.weight": (256, 256, 3, 3),
        "layer3.22.bn3.num_batches_tracked": (),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "layer6.conv2d_list.0.weight": (15, 2048, 3, 3),
        "layer6.conv2d_list.3.bias": (15,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "layer3.23.conv1.weight" not in sd and "layer4.3.conv1.weight" not in sd
    assert not any(k.startswith("layer5.") for k in sd)
    # Caffe style: the stride is on the first 1x1 conv, dilation on the 3x3 conv
    assert resnet101.layer2[0].conv1.stride == (2, 2)
    assert resnet101.layer2[0].conv2.stride == (1, 1)
    assert resnet101.layer3[5].conv2.dilation == (2, 2)
    assert resnet101.layer4[1].conv2.padding == (4, 4)
    assert resnet101.maxpool.ceil_mode is False


def test_multi_level_adds_layer5():
    m = DeepLabV2(num_classes=12, multi_level=True, layers=(1, 1, 1, 1), width=8)
    sd = m.state_dict()
    assert tuple(sd["layer5.conv2d_list.2.weight"].shape) == (12, 128, 3, 3)  # 16·width in
    assert tuple(sd["layer6.conv2d_list.2.weight"].shape) == (12, 256, 3, 3)  # 32·width in
    assert [c.dilation[0] for c in m.layer5.conv2d_list] == [6, 12, 18, 24]
    assert [c.padding[0] for c in m.layer6.conv2d_list] == [6, 12, 18, 24]


def test_trainable_backbone_and_release_repeats(resnet101):
    assert not any(p.requires_grad for p in resnet101.bn1.parameters())
    assert resnet101.layer1[0].bn1.weight.requires_grad  # only the stem BN is frozen
    assert len(resnet101.backbone_parameters()) == 310
    assert len(resnet101.classifier_parameters()) == 8
    reps = resnet101.release_param_repeats()
    assert len(reps) == 310
    assert sum(c for _, _, c in reps) == 940
    by_count = {}
    for name, _, c in reps:
        by_count.setdefault(c, []).append(name)
    assert sorted(by_count) == [1, 3, 4]
    assert by_count[1] == ["conv1.weight"]
    assert len(by_count[3]) == 297
    assert len(by_count[4]) == 12 and all(".downsample." in n for n in by_count[4])
    assert {id(p) for _, p, _ in reps} == {id(p) for p in resnet101.backbone_parameters()}


def test_init_statistics(resnet101):
    w = resnet101.layer3[3].conv2.weight
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.01, rel=0.02)
    w = resnet101.layer6.conv2d_list[1].weight
    assert w.std().item() == pytest.approx(0.01, rel=0.02)
    bound = 1 / math.sqrt(2048 * 9)  # PyTorch's default bias init (uniform ± 1/sqrt(fan_in))
    b = resnet101.layer6.conv2d_list[1].bias
    assert b.abs().max().item() <= bound and b.abs().max().item() > bound / 10
    bn = resnet101.layer2[1].bn2
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_resnet101_output_size(resnet101):
    resnet101.eval()
    with torch.no_grad():
        out = resnet101(torch.randn(1, 3, 65, 97))
    assert out.shape == (1, 15, 9, 13)  # ⌈65/8⌉, ⌈97/8⌉


@pytest.mark.parametrize("size,out", [((65, 97), (9, 13)), ((64, 128), (8, 16)),
                                      ((17, 9), (3, 2)), ((100, 150), (13, 19))])
def test_output_sizes(size, out):
    m = DeepLabV2(num_classes=5, multi_level=True, layers=(1, 1, 1, 1), width=4).eval()
    with torch.no_grad():
        main, aux = m(torch.randn(2, 3, *size))
    assert main.shape == (2, 5, *out) and aux.shape == (2, 5, *out)


def _ref_bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                        bn.eps)


def _ref_deeplab(m, x, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1)):
    """DeepLab-v2 forward written from method §3.1 with F.* calls on the module's weights."""
    x = F.relu(_ref_bn(F.conv2d(x, m.conv1.weight, stride=2, padding=3), m.bn1))
    x = F.max_pool2d(x, 3, 2, 1, ceil_mode=False)
    feats = []
    for li, layer in enumerate((m.layer1, m.layer2, m.layer3, m.layer4)):
        for bi, blk in enumerate(layer):
            s = strides[li] if bi == 0 else 1
            d = dilations[li]
            out = F.relu(_ref_bn(F.conv2d(x, blk.conv1.weight, stride=s), blk.bn1))
            out = F.relu(_ref_bn(F.conv2d(out, blk.conv2.weight, padding=d, dilation=d), blk.bn2))
            out = _ref_bn(F.conv2d(out, blk.conv3.weight), blk.bn3)
            res = x
            if bi == 0:
                res = _ref_bn(F.conv2d(x, blk.downsample[0].weight, stride=s), blk.downsample[1])
            x = F.relu(out + res)
        feats.append(x)

    def head(mod, f):
        return sum(F.conv2d(f, c.weight, c.bias, padding=r, dilation=r)
                   for c, r in zip(mod.conv2d_list, (6, 12, 18, 24)))

    return head(m.layer6, feats[3]), head(m.layer5, feats[2])


def test_deeplab_matches_functional_reference():
    m = DeepLabV2(num_classes=4, multi_level=True, layers=(2, 2, 2, 2), width=4).double().eval()
    # non-trivial BN statistics so that every BN matters
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.1, 0.1)
    x = torch.randn(2, 3, 41, 54, dtype=torch.float64)
    with torch.no_grad():
        main, aux = m(x)
        ref_main, ref_aux = _ref_deeplab(m, x)
    torch.testing.assert_close(main, ref_main, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-10, atol=1e-12)


def test_deeplab_rejects_bad_input():
    m = DeepLabV2(layers=(1, 1, 1, 1), width=4)
    with pytest.raises(ValueError, match="B×3×H×W"):
        m(torch.zeros(1, 4, 16, 16))


# ---- FlowNetS ----------------------------------------------------------------------------------
def test_flownet_keys_and_count():
    f = FlowNetS()
    sd = f.state_dict()
    assert sum(p.numel() for p in f.parameters()) == 5_462_674  # ≈ 5.46 M (method §3.2)
    expected = {
        "conv1.0.weight": (24, 6, 7, 7), "conv3_1.0.bias": (96,),
        "conv6_1.0.weight": (384, 384, 3, 3), "deconv5.0.weight": (384, 192, 4, 4),
        "deconv5.0.bias": (192,), "deconv2.0.weight": (146, 24, 4, 4),
        "predict_flow6.weight": (2, 384, 3, 3), "predict_flow5.weight": (2, 386, 3, 3),
        "predict_flow2.weight": (2, 74, 3, 3), "upsample_flow6to5.weight": (2, 2, 4, 4),
        "upsample_flow3to2.bias": (2,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 2 * (10 + 4 + 5 + 4)


def _ref_flownet(f, x):
    """FlowNetS from method §3.2; the "antipad" crop written as a padding-1 transposed conv
    truncated to the skip size (an independent formulation of the same rule)."""
    def conv(seq, x, s, k):
        c = seq[0]
        return F.leaky_relu(F.conv2d(x, c.weight, c.bias, s, (k - 1) // 2), 0.1)

    def up(mod, x, like, act):
        y = F.conv_transpose2d(x, mod.weight, mod.bias, stride=2, padding=1)
        y = y[:, :, :like.shape[2], :like.shape[3]]
        return F.leaky_relu(y, 0.1) if act else y

    c2 = conv(f.conv2, conv(f.conv1, x, 2, 7), 2, 5)
    c3 = conv(f.conv3_1, conv(f.conv3, c2, 2, 5), 1, 3)
    c4 = conv(f.conv4_1, conv(f.conv4, c3, 2, 3), 1, 3)
    c5 = conv(f.conv5_1, conv(f.conv5, c4, 2, 3), 1, 3)
    c6 = conv(f.conv6_1, conv(f.conv6, c5, 2, 3), 1, 3)

    def pred(mod, x):
        return F.conv2d(x, mod.weight, mod.bias, 1, 1)

    fl = pred(f.predict_flow6, c6)
    cat = c6
    for skip, dec, upf, pr in ((c5, f.deconv5, f.upsample_flow6to5, f.predict_flow5),
                               (c4, f.deconv4, f.upsample_flow5to4, f.predict_flow4),
                               (c3, f.deconv3, f.upsample_flow4to3, f.predict_flow3),
                               (c2, f.deconv2, f.upsample_flow3to2, f.predict_flow2)):
        cat = torch.cat((skip, up(dec[0], cat, skip, True), up(upf, fl, skip, False)), 1)
        fl = pred(pr, cat)
    return fl * 5.0


@pytest.mark.parametrize("size,out", [((64, 128), (16, 32)), ((65, 97), (17, 25)),
                                      ((33, 50), (9, 13)), ((1, 1), (1, 1))])
def test_flownet_sizes_and_reference(size, out):
    f = FlowNetS().double().eval()
    x = torch.rand(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        y = f(x)
        ref = _ref_flownet(f, x)
    assert y.shape == (2, 2, *out)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


def test_flownet_rejects_bad_input():
    with pytest.raises(ValueError, match="B×6×H×W"):
        FlowNetS()(torch.zeros(1, 3, 16, 16))
