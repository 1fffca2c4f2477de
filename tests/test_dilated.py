"""`--dilated-impl s2b` (sfc.models.dilated, issue 18): the backbone's dilated 3×3
convolutions as ordinary convolutions on the space-to-batch view equal PyTorch's dilated
convolution — outputs and the gradients of input, weight and bias — in float64 to 1e-12 for
divisible and non-divisible map sizes, in float32 to rounding, in channels_last, and through a
whole DeepLab-v2 (forward and backward)."""

import pytest
import torch
import torch.nn.functional as F

from sfc.models import DeepLabV2
from sfc.models.dilated import (
    dilated_conv,
    dilated_impl,
    get_dilated_impl,
    s2b_conv2d,
    set_dilated_impl,
)


def _grads(fn, x, w, b):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(9))
    (y * g).sum().backward()
    return y.detach(), x.grad, w.grad, (None if b is None else b.grad)


@pytest.mark.parametrize("d,h,w,bias", [(2, 16, 12, False), (4, 16, 12, True), (2, 9, 7, True),
                                        (4, 10, 6, False), (3, 5, 11, True), (4, 3, 2, False)])
def test_s2b_equals_the_dilated_convolution_in_float64(d, h, w, bias):
    gen = torch.Generator().manual_seed(d * 100 + h * 10 + w)
    x = torch.randn(2, 5, h, w, dtype=torch.float64, generator=gen)
    wt = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(7, dtype=torch.float64, generator=gen) if bias else None
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, padding=d, dilation=d), x, wt, b)
    got = _grads(lambda x, w, b: s2b_conv2d(x, w, b, d), x, wt, b)
    assert got[0].shape == (2, 7, h, w)
    for r, g in zip(ref, got):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_s2b_in_float32_and_channels_last():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 20, 14, generator=gen).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(16, 16, 3, 3, generator=gen) * 0.1
    ref = F.conv2d(x, wt, None, padding=2, dilation=2)
    got = s2b_conv2d(x, wt, None, 2)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_only_the_backbones_dilated_convolutions_take_the_s2b_path():
    conv = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
    plain = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
    other = torch.nn.Conv2d(4, 4, 3, padding=1, dilation=2, bias=False)  # padding ≠ dilation
    x = torch.randn(1, 4, 8, 8)
    calls = []
    import sfc.models.dilated as mod

    real = mod.s2b_conv2d
    try:
        mod.s2b_conv2d = lambda *a: calls.append(a[3]) or real(*a)
        with dilated_impl("s2b"):
            for m in (conv, plain, other):
                torch.testing.assert_close(dilated_conv(m, x), m(x), rtol=1e-5, atol=1e-6)
        dilated_conv(conv, x)  # native again
    finally:
        mod.s2b_conv2d = real
    assert calls == [2]


def test_deeplab_with_s2b_equals_native_forward_and_backward(monkeypatch):
    """A small DeepLab-v2 (dilations 2 and 4 in layer3/layer4) on a map of 9×7 features (not a
    multiple of 2 or 4) in train mode: logits and every parameter gradient equal (float64);
    the three dilated convolutions (two blocks of layer3, one of layer4) took the s2b path."""
    import sfc.models.dilated as mod

    calls, real = [], mod.s2b_conv2d
    monkeypatch.setattr(mod, "s2b_conv2d", lambda *a: calls.append(a[3]) or real(*a))
    torch.manual_seed(0)
    net = DeepLabV2(5, multi_level=True, layers=(1, 1, 2, 1), width=4).double().train()
    x = torch.randn(1, 3, 72, 56, dtype=torch.float64)
    out = {}
    for mode in ("native", "s2b"):
        net.zero_grad(set_to_none=True)
        with dilated_impl(mode):
            main, aux = net(x)
        (main.square().mean() + aux.abs().mean()).backward()
        out[mode] = (main.detach(), aux.detach(),
                     {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert out["native"][0].shape[-2:] == (9, 7) and calls == [2, 2, 4]
    torch.testing.assert_close(out["s2b"][0], out["native"][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["s2b"][1], out["native"][1], rtol=1e-10, atol=1e-12)
    assert out["s2b"][2].keys() == out["native"][2].keys() and len(out["s2b"][2]) > 20
    for n, g in out["native"][2].items():
        torch.testing.assert_close(out["s2b"][2][n], g, rtol=1e-9, atol=1e-12, msg=n)


def test_the_switch_rejects_an_unknown_mode_and_restores():
    assert get_dilated_impl() == "native"
    with dilated_impl("s2b"):
        assert get_dilated_impl() == "s2b"
    assert get_dilated_impl() == "native"
    with pytest.raises(ValueError, match="must be one of \\('native', 's2b'\\), got 'fast'"):
        set_dilated_impl("fast")


@pytest.fixture()
def native_after():
    """The switch is process-wide (the engine and the bench set it): back to native after."""
    yield
    set_dilated_impl("native")


def test_engine_run_with_s2b_follows_the_native_run(native_after, tiny_data, tmp_path,
                                                    monkeypatch):
    """`sfc.train --dilated-impl s2b`: the dilated convolutions take the s2b path (and only in
    that run), the log and config.json say so, and 4 iterations end with the native run's
    parameters within float32 rounding."""
    import json

    from conftest import TINY_TRAIN

    import sfc.models.dilated as mod
    from sfc import train
    from sfc.train import runio

    calls, real = [], mod.s2b_conv2d
    monkeypatch.setattr(mod, "s2b_conv2d", lambda *a: calls.append(a[3]) or real(*a))

    def run(out, *extra):
        return train.main(["--stage", "segnet", "--imagenet-init", "none", "--data",
                           str(tiny_data), "--out", str(out), *TINY_TRAIN, "--iters", "4",
                           "--eval-every", "4", "--seed", "3", *extra])

    assert run(tmp_path / "s2b", "--dilated-impl", "s2b") == 0
    n = len(calls)
    assert n > 0
    assert run(tmp_path / "native") == 0
    assert len(calls) == n
    assert get_dilated_impl() == "native"  # each run sets it from its own flags
    assert "dilated convolutions on the space-to-batch view" in (
        tmp_path / "s2b" / "log.txt").read_text()
    cfg = json.loads((tmp_path / "s2b" / "config.json").read_text())["config"]
    assert cfg["precision"]["dilated_impl"] == "s2b"
    m = {k: runio.load_checkpoint(tmp_path / k / "last.pt")["models"]["segnet"]
         for k in ("s2b", "native")}
    for name, v in m["native"].items():
        if v.is_floating_point():
            torch.testing.assert_close(m["s2b"][name], v, rtol=1e-4, atol=1e-6, msg=name)


def test_bench_s2b_rows_are_labelled_and_the_release_lockstep_holds(native_after, tmp_path):
    """`sfc.bench --dilated-impl s2b`: the rows say so (and their label); the release-style
    reference (native dilated convolutions, its own code) gives the same losses as the
    project's step on the s2b path."""
    import json

    from sfc.bench.cli import main as bench_main
    from sfc.bench.report import config_label

    path = tmp_path / "b.json"
    assert bench_main(["--device", "cpu", "--size", "64", "32", "--layers", "1", "1", "1", "1",
                       "--width", "8", "--iters", "1", "--warmup", "0", "--eval-images", "0",
                       "--no-flops", "--threads", "1", "--stages", "segnet_sfc",
                       "--reference", "--reference-stages", "segnet_sfc",
                       "--dilated-impl", "s2b", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    (row,) = res["stages"]
    assert row["dilated_impl"] == "s2b" and config_label(row) == "fp32 s2b"
    assert res["meta"]["dilated_impl"] == "s2b"
    (ref,) = res["reference"]
    assert ref["losses_equal"] and ref["max_rel_loss_diff"] <= 1e-4


def test_conv_micro_benchmark_on_the_cpu(tmp_path):
    """`python -m sfc.bench.convs` at a tiny scale: a row per shape and precision, both ways
    timed, outputs equal (float32 to rounding; bf16 to its rounding), JSON and table written."""
    import json

    from sfc.bench import convs

    path = tmp_path / "convs.json"
    assert convs.main(["--device", "cpu", "--scale", "0.05", "--iters", "1", "--warmup", "0",
                       "--precisions", "fp32", "fp32-strict", "bf16", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert [(r["name"], r["precision"]) for r in res["rows"]] == [
        (name, p) for p in ("fp32", "fp32-strict", "bf16") for name, *_ in convs.SHAPES]
    assert torch.backends.cudnn.allow_tf32  # fp32-strict turned TF32 off for its rows only
    for r in res["rows"]:
        assert all(r[k] > 0 for k in ("native_fwd_ms", "s2b_fwd_ms", "native_fwd_bwd_ms",
                                      "s2b_fwd_bwd_ms"))
        assert r["rel_diff"] < (2e-2 if r["precision"] == "bf16" else 1e-5), r
    md = path.with_suffix(".md").read_text().splitlines()
    assert len(md) == 2 + 12 and md[2].startswith("| layer3 source (×23) | fp32 |")
