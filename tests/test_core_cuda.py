"""Models and losses on CUDA agree with CPU in float32 (needs a GPU; skipped otherwise)."""

import copy

import pytest
import torch

from sfc.losses import accel_sfc_loss, seg_loss, sfc_loss, sfm_loss
from sfc.models import Accel, DeepLabV2, FlowNetS, warp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
RTOL = 1e-4


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 convolutions/matmuls would differ from CPU float32 by ~1e-3; compare true fp32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _close(cpu, gpu, what, tol=RTOL):
    cpu, gpu = cpu.detach().double(), gpu.detach().cpu().double()
    scale = cpu.abs().max().clamp(min=1e-12)
    err = (cpu - gpu).abs().max() / scale
    assert err < tol, f"{what}: max relative error {err.item():.2e}"


def _pair(module):
    return module.eval(), copy.deepcopy(module).cuda().eval()


def test_models_cuda_match_cpu(small_backbone):
    cpu, gpu = _pair(DeepLabV2(num_classes=15, multi_level=True, **small_backbone))
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        for a, b, n in zip(cpu(x), gpu(x.cuda()), ("main", "aux")):
            _close(a, b, f"DeepLabV2 {n}")
    cpu, gpu = _pair(FlowNetS())
    x = torch.rand(2, 6, 65, 97)
    with torch.no_grad():
        _close(cpu(x), gpu(x.cuda()), "FlowNetS")
    x, flow = torch.randn(2, 4, 17, 25), torch.randn(2, 2, 17, 25) * 4
    _close(warp(x, flow), warp(x.cuda(), flow.cuda()), "warp")
    cpu, gpu = _pair(Accel(num_classes=15, **small_backbone))
    seg, flo = torch.randn(1, 3, 2, 64, 96), torch.rand(1, 3, 2, 64, 96)
    with torch.no_grad():
        _close(cpu(seg, flo), gpu(seg.cuda(), flo.cuda()), "Accel")


def test_losses_cuda_match_cpu(small_backbone):
    fg_c, fg_g = _pair(FlowNetS())
    sfm_c, sfm_g = _pair(FlowNetS())
    imgs = torch.rand(2, 2, 3, 64, 96)
    results = []
    for fg, sfm, dev in ((fg_c, sfm_c, "cpu"), (fg_g, sfm_g, "cuda")):
        torch.manual_seed(3)
        lp = torch.randn(2, 15, 8, 12).to(dev).requires_grad_()
        lc = torch.randn(2, 15, 8, 12).to(dev).requires_grad_()
        i0, i1 = imgs[0].to(dev), imgs[1].to(dev)
        loss = sfc_loss(lp, lc, i0, i1, fg, sfm)
        loss.backward()
        gt = torch.randint(-1, 15, (2, 64, 96), generator=torch.Generator().manual_seed(4))
        ce = seg_loss(lc, gt.to(dev))
        sl = sfm_loss(i0, i1, gt.to(dev), gt.roll(3, 2).to(dev), fg, sfm,
                      gt_down4x=gt[:, ::4, ::4].to(dev))
        results.append((loss, lp.grad, lc.grad, ce, sl))
    # The SFC loss's logit gradients pass through softmax(100 · logits): the scale turns the
    # last-bit differences of CUDA's and the CPU's float32 kernels into relative differences of
    # ~2e-4 (measured 2.1e-4 on an H200); the values themselves agree to 1e-4.
    for a, b, n, tol in zip(*results, ("sfc_loss", "d/dlogits_prev", "d/dlogits_cur",
                                       "seg_loss", "sfm_loss"),
                            (RTOL, 1e-3, 1e-3, RTOL, RTOL)):
        _close(a, b, n, tol)
    a_c, a_g = _pair(Accel(num_classes=5, **small_backbone))
    seg3, flo3 = torch.randn(1, 3, 3, 64, 96), torch.rand(1, 3, 3, 64, 96)
    out = []
    for acc, fg, sfm, dev in ((a_c, fg_c, sfm_c, "cpu"), (a_g, fg_g, sfm_g, "cuda")):
        s3, f3 = seg3.to(dev), flo3.to(dev)
        loss = accel_sfc_loss(s3[:, :, 1:], f3[:, :, 1:], s3[:, :, :2], f3[:, :, :2], acc, fg, sfm)
        loss.backward()
        out.append((loss, acc.merge.weight.grad))
    for a, b, n in zip(*out, ("accel_sfc_loss", "d/dmerge.weight")):
        _close(a, b, n)


def test_aspp_gemm_form_on_cuda_matches_cpu():
    """The classifier's GEMM form (CPU default; forced here) also runs on CUDA and matches."""
    from sfc.models.aspp_gemm import aspp_impl
    from sfc.models.deeplab import ClassifierModule

    cpu = ClassifierModule(64, 15)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 64, 16, 32)
    go = torch.randn(2, 15, 16, 32)
    res = []
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        xd = x.detach().clone().to(dev).requires_grad_()  # a leaf on each device
        with aspp_impl("gemm"):
            y = m(xd)
            y.backward(go.to(dev))
        res.append((y, xd.grad, m.conv2d_list[3].weight.grad))
    for a, b, n in zip(*res, ("out", "d/dx", "d/dW_24")):
        _close(a, b, n)


def test_dilated_s2b_on_cuda_matches_the_cpu_dilated_convolution():
    """`--dilated-impl s2b` on CUDA (the convolution library's ordinary 3×3 kernels, channels
    first and channels_last) against the CPU's dilated convolution: output and the three
    gradients, a map not a multiple of the dilation included."""
    import torch.nn.functional as F

    from sfc.models.dilated import s2b_conv2d

    for d, (h, w), cl in ((2, (16, 12), False), (4, (10, 23), False), (2, (9, 7), True)):
        x, wt = torch.randn(1, 32, h, w), torch.randn(48, 32, 3, 3) * 0.05
        b, go = torch.randn(48), torch.randn(1, 48, h, w)
        res = []
        for dev in ("cpu", "cuda"):
            xd = x.to(dev)
            if cl and dev == "cuda":
                xd = xd.contiguous(memory_format=torch.channels_last)
            xd, wd, bd = (t.detach().clone().to(dev).requires_grad_() for t in (xd, wt, b))
            y = (F.conv2d(xd, wd, bd, padding=d, dilation=d) if dev == "cpu"
                 else s2b_conv2d(xd, wd, bd, d))
            y.backward(go.to(dev))
            res.append((y, xd.grad, wd.grad, bd.grad))
        for a, g, n in zip(*res, ("out", "d/dx", "d/dW", "d/db")):
            _close(a, g, f"d={d} {h}x{w} cl={cl} {n}")


def test_raw_clip_normalisation_on_cuda_is_bit_identical():
    """Training clips are normalised on the device by table lookup: the same float32 values
    as the datasets' NumPy path, exactly."""
    import numpy as np

    from sfc.data.io import clip_arrays, clip_bgr, normalise_bgr

    g = np.random.default_rng(0)
    frames = [g.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]
    seg, flow = clip_arrays(frames)
    s, f = normalise_bgr(torch.from_numpy(clip_bgr(frames))[None].cuda())
    assert torch.equal(s[0].cpu(), torch.from_numpy(seg))
    assert torch.equal(f[0].cpu(), torch.from_numpy(flow))


@pytest.mark.parametrize("channels_last", [False, True])
def test_stacked_batchnorm_on_cuda_matches_the_cpu_one_after_the_other(channels_last):
    """`--stack-forwards` on CUDA (cuDNN's BatchNorm on the (1, 2C, H, W) view): a DeepLab-v2
    on two stacked frames against the CPU's two forwards — outputs, gradients and running
    statistics."""
    from sfc.models.stacked import split_stacked, stacked

    torch.manual_seed(0)
    cpu = DeepLabV2(5, multi_level=True, layers=(1, 1, 2, 1), width=8).train()
    gpu = copy.deepcopy(cpu).cuda()
    if channels_last:
        gpu = gpu.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(1, 3, 48, 64, generator=g) * (1 + j) + j for j in range(2))
    outs_cpu = [*cpu(a), *cpu(b)]
    x = torch.cat((a, b)).cuda()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with stacked(2):
        both = gpu(x)
    outs_gpu = [t for pair in split_stacked(both, 2) for t in pair]
    w = [torch.randn(o.shape, generator=g) for o in outs_cpu]
    sum((o * v).sum() for o, v in zip(outs_cpu, w)).backward()
    sum((o * v.cuda()).sum() for o, v in zip(outs_gpu, w)).backward()
    for i, (c, d) in enumerate(zip(outs_cpu, outs_gpu)):
        _close(c, d, f"output {i}")
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if p.grad is not None:
            _close(p.grad, q.grad, f"grad {n}", tol=1e-3)
    for (n, p), q in zip(cpu.named_buffers(), gpu.buffers()):
        _close(p.float(), q.float(), n)
