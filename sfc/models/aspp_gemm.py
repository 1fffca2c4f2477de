"""DeepLab-v2's classifier (four dilated 3×3 convs, outputs summed) as GEMMs, for training.

The classifier has only C (15 or 12) output channels and dilations 6–24, a shape for which
oneDNN's convolution is slow on the CPU, its backward most of all: at ResNet-101, 256×128 input
(16×32 features), `layer6`'s backward takes ≈ 38 ms per branch against ≈ 6 ms for its forward,
and the two classifiers' backward was ≈ 10 % of an SFC stage-one step (`torch.profiler`;
docs/benchmark.md).

`AsppSum` computes the same function in the "shift" form of a convolution. Each of the T
distinct taps (i, j) of the four branches is a matrix `W_tap` (C × Cin) applied at an offset
`(i·d, j·d)`; the centre tap, shared by all four branches, is one matrix (their sum), and taps
that fall wholly into the zero padding (|offset| ≥ H or W: e.g. 12 of the 36 at 16×32) are
left out — they contribute exactly 0. With `Wm` the T·C × Cin stack of the tap matrices:
    forward      Y = Wm · x  (T·C × H·W), out = Σ_tap shift(Y_tap, offset) + Σ_b bias_b
    grad x       = Wmᵀ · G,  G = the T shifted copies of the output gradient (T·C × H·W)
    grad W_tap   = G_tap · xᵀ (one GEMM for all taps),   grad bias_b = Σ go
Only the summation order differs from the convolutions' (float32: ≈ 3e-7 relative on the
output and the gradients; tests). Measured on this repository's 2-core CPU at 16×32 features:
forward 15.9 → 5.8 ms, forward + backward of `layer6` ≈ 216 → 40 ms.

Which form runs: `set_aspp_impl("auto" | "gemm" | "conv")` / `aspp_impl(mode)`. "auto"
(default) uses the GEMM form on the CPU and `nn.Conv2d` elsewhere (cuDNN is not known to be
slow here; `python -m sfc.bench --aspp-impl` measures both). The GEMM form is used only when a
gradient is needed and not under autocast: evaluation and `no_grad` forwards always run the
release's `nn.Conv2d` path.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .switch import ImplSwitch

MODES = ("auto", "gemm", "conv")
_SWITCH = ImplSwitch("ASPP implementation", MODES, "auto")


def set_aspp_impl(mode: str) -> None:
    """Choose the training classifier process-wide: "auto" (GEMM on CPU), "gemm" or "conv"."""
    _SWITCH.set(mode)


def get_aspp_impl() -> str:
    return _SWITCH.get()


def aspp_impl(mode: str):
    """Temporarily set the classifier form (e.g. "conv" for a release-style reference)."""
    return _SWITCH.context(mode)


def use_gemm(x: torch.Tensor, params) -> bool:
    """Whether `ClassifierModule.forward` should run through `AsppSum` for this input."""
    mode = _SWITCH.mode
    if mode == "conv" or not torch.is_grad_enabled():
        return False
    if mode == "auto" and x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return x.requires_grad or any(p.requires_grad for p in params)


def _taps(dilations, h: int, w: int):
    """Distinct taps with any overlap with the h×w map: [(branch, i, j, dy, dx)], the centre
    tap (shared by all branches) first as (-1, 1, 1, 0, 0)."""
    taps = [(-1, 1, 1, 0, 0)]
    for b, d in enumerate(dilations):
        for i in range(3):
            for j in range(3):
                dy, dx = (i - 1) * d, (j - 1) * d
                if (i, j) != (1, 1) and abs(dy) < h and abs(dx) < w:
                    taps.append((b, i, j, dy, dx))
    return taps


def _span(off: int, n: int) -> tuple[slice, slice]:
    """(output positions, input positions) along one axis for a tap offset `off`."""
    return slice(max(0, -off), n - max(0, off)), slice(max(0, off), n + min(0, off))


def _tap_matrix(ws, taps) -> torch.Tensor:
    """(T·C, Cin): the centre matrix Σ_b W_b[:, :, 1, 1], then each other tap's W_b[:, :, i, j]."""
    centre = ws[0][:, :, 1, 1]
    for wt in ws[1:]:
        centre = centre + wt[:, :, 1, 1]
    wm = torch.stack([centre] + [ws[b][:, :, i, j] for b, i, j, _, _ in taps[1:]])
    return wm.reshape(-1, wm.shape[-1])


def _channels_last(x: torch.Tensor) -> bool:
    """x is laid out N×H×W×C (and not also plain NCHW, as 1×1 maps can be)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (N, Cin, H, W) as (N, H·W, Cin): a view for NCHW and channels_last memory alike."""
    n, cin, h, w = x.shape
    if _channels_last(x):
        return x.permute(0, 2, 3, 1).reshape(n, h * w, cin)
    return x.reshape(n, cin, h * w).transpose(1, 2)


class AsppSum(torch.autograd.Function):
    """`Σ_b conv2d(x, W_b, bias_b, padding=d_b, dilation=d_b)` (3×3, stride 1) in GEMM form.
    Call as `AsppSum.apply(x, dilations, W_0, b_0, W_1, b_1, ...)`."""

    @staticmethod
    def forward(ctx, x, dilations, *wb):
        ws, bs = wb[0::2], wb[1::2]
        n, cin, h, w = x.shape
        c = ws[0].shape[0]
        taps = _taps(dilations, h, w)
        wm = _tap_matrix(ws, taps)  # (T·C, Cin)
        y = torch.matmul(wm, _rows(x).transpose(1, 2)).view(n, len(taps), c, h, w)
        bias = bs[0]
        for b in bs[1:]:
            bias = bias + b
        out = y[:, 0] + bias.view(1, c, 1, 1)  # the centre tap covers every position
        for k, (_, _, _, dy, dx) in enumerate(taps[1:], 1):
            (oh, ih), (ow, iw) = _span(dy, h), _span(dx, w)
            out[:, :, oh, ow] += y[:, k, :, ih, iw]
        ctx.dilations = tuple(dilations)
        ctx.save_for_backward(x, *ws)
        if _channels_last(x):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, go):
        x, *ws = ctx.saved_tensors
        n, cin, h, w = x.shape
        c = go.shape[1]
        p = h * w
        taps = _taps(ctx.dilations, h, w)
        t = len(taps)
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[2::2]
        need_b = ctx.needs_input_grad[3::2]

        # G[n, tap, c, q] = go[n, c, q - offset(tap)] (zero where that position is outside)
        g = go.new_zeros(n, t, c, h, w)
        for k, (_, _, _, dy, dx) in enumerate(taps):
            (oh, ih), (ow, iw) = _span(dy, h), _span(dx, w)
            g[:, k, :, ih, iw] = go[:, :, oh, ow]
        g = g.view(n, t * c, p)

        channels_last = _channels_last(x)
        xpc = _rows(x)  # (n, p, cin)

        grads_w = [None] * len(ws)
        if any(need_w):
            gw_rows = torch.matmul(g, xpc)  # (n, t·c, cin)
            gw_rows = (gw_rows.sum(0) if n > 1 else gw_rows[0]).view(t, c, cin)
            for bi, wt in enumerate(ws):
                if need_w[bi]:
                    grads_w[bi] = wt.new_zeros(wt.shape)
            for k, (b, i, j, _, _) in enumerate(taps):
                for bi in ([b] if b >= 0 else range(len(ws))):
                    if grads_w[bi] is not None:
                        grads_w[bi][:, :, i, j] = gw_rows[k]

        gx = None
        if need_x:
            wm = _tap_matrix(ws, taps)  # rows in G's (tap, class) order
            if channels_last:  # (n, p, cin) → N×H×W×C memory, returned as channels_last
                gx = torch.matmul(g.transpose(1, 2), wm).view(n, h, w, cin).permute(0, 3, 1, 2)
            else:
                gx = torch.matmul(wm.t(), g).view(n, cin, h, w)

        gb = go.sum((0, 2, 3)) if any(need_b) else None
        out = [gx, None]
        for bi in range(len(ws)):
            out += [grads_w[bi], gb.clone() if need_b[bi] else None]
        return tuple(out)
