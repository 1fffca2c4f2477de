"""Several forwards of one network as one batch, each with its own BatchNorm statistics.

The SFC stages run the same network more than once per iteration on inputs of the same size:
SFC stage one runs the SegNet on target frames t-1 and t, SFC stage two runs Accel on the
clips (t-1, t) and (t-2, t-1). With BatchNorm in train mode (quirk 2) these forwards cannot
simply be batched: a batch of two would normalise both with statistics over both inputs. Here
they can: inside `stacked(k)` the batch is read as k equal chunks, one per forward, and every
`StackableBatchNorm2d` normalises each chunk with that chunk's own statistics — what k separate
forwards compute — and moves its running statistics as k forwards one after the other would:

    r ← (1 − m)·r + m·s_j   for the chunks j = 0 … k-1 in order   (m: momentum 0.1)

`num_batches_tracked` grows by k. How: the (k·b, C, H, W) batch is viewed as (b, k·C, H, W)
(a free view at b = 1), normalised by one `F.batch_norm` with the weight and bias repeated k
times. Its running update goes into k·C buffers that hold the module's statistics for chunk 0
and zeros for the others, so the kernel leaves r_1 = (1 − m)·r_0 + m·s_0 and t_j = m·s_j for
j ≥ 1 (each computed as an unstacked forward computes it); then r_j = t_j + (1 − m)·r_{j-1}
folds them into the module's buffers (one operation per buffer at k = 2). The gradients are
those of the k forwards summed, as autograd sums them over the k copies of the weight and
bias. Everything else in the networks (convolutions, FlowNetS, the warp, upsampling, `merge`)
is per sample anyway.

So `net(torch.cat((a, b)))` inside `stacked(2)` equals `net(a)` then `net(b)` — outputs,
gradients and running statistics — within float32 rounding (tests: float64 to 1e-12), while
each convolution, BatchNorm and activation runs once on twice the work. The price: about ten
small per-channel operations per BatchNorm call (the repeated weight and bias, the buffers of
the statistics, the fold, and the weight's gradient summed back), so the number of operations
hardly falls (SFC stage one) or grows (SFC stage two, whose frozen backbones have no backward
to save): whether the larger kernels pay for the small ones is a GPU measurement
(`sfc.bench --stack-forwards both`).
Outside `stacked` (k = 1) and in eval mode the module is an ordinary `nn.BatchNorm2d`; the
state-dict keys are those of `nn.BatchNorm2d`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_CHUNKS = 1  # forwards stacked in the batch of the current call (1: an ordinary forward)


@contextmanager
def stacked(k: int):
    """Inside: a train-mode `StackableBatchNorm2d` reads its batch as `k` stacked forwards."""
    global _CHUNKS
    if int(k) < 1:
        raise ValueError(f"stacked(k) needs k >= 1, got {k}")
    old, _CHUNKS = _CHUNKS, int(k)
    try:
        yield
    finally:
        _CHUNKS = old


def stacked_chunks() -> int:
    """The `k` of the innermost `stacked(k)` (1 outside)."""
    return _CHUNKS


class StackableBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` that, in train mode inside `stacked(k)`, normalises the k chunks of
    its batch separately (module docstring). Same parameters, buffers and keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = _CHUNKS
        if k == 1 or not self.training:
            return super().forward(x)
        return chunked_batch_norm(self, x, k)


def chunked_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, k: int) -> torch.Tensor:
    """Train-mode `bn` on each of the `k` equal chunks of `x`'s batch, as k calls of `bn`
    one after the other would compute it (outputs, gradients, running statistics)."""
    n, c, h, w = x.shape
    if n % k:
        raise ValueError(f"stacked({k}): the batch of {n} is not {k} equal forwards")
    if bn.track_running_stats and bn.momentum is None:
        raise ValueError("stacked forwards need a BatchNorm momentum (not a cumulative average)")
    b = n // k
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    # chunk j, channel i → channel j·C + i of a batch of b. At b = 1 that is the same memory:
    # a view in, and out an `_unsafe_view`, which autograd does not track as a view — the
    # networks' in-place ReLU and residual add on a tracked view would make its backward
    # copy whole activations (CopySlices)
    flat = b == 1 and x.is_contiguous()
    z = x.view(1, k * c, h, w) if flat else (
        x.reshape(k, b, c, h, w).transpose(0, 1).reshape(b, k * c, h, w))
    weight = bn.weight.repeat(k) if bn.weight is not None else None
    bias = bn.bias.repeat(k) if bn.bias is not None else None
    track = bn.track_running_stats and bn.running_mean is not None
    if not track:
        y = F.batch_norm(z, None, None, weight, bias, True, 0.0, bn.eps)
    else:
        # chunk 0 starts from the module's statistics (→ r_1 = (1-m)·r_0 + m·s_0), the others
        # from 0 (→ t_j = m·s_j); then r_j = t_j + (1-m)·r_{j-1}
        pad = bn.running_mean.new_zeros((k - 1) * c)
        means = torch.cat((bn.running_mean, pad))
        varis = torch.cat((bn.running_var, pad))
        y = F.batch_norm(z, means, varis, weight, bias, True, bn.momentum, bn.eps)
        with torch.no_grad():
            keep = 1.0 - bn.momentum
            for new, run in ((means, bn.running_mean), (varis, bn.running_var)):
                r = new[:c]
                for j in range(1, k):
                    r = torch.add(new[j * c:(j + 1) * c], r, alpha=keep,
                                  out=run if j == k - 1 else None)
                if k == 1:
                    run.copy_(r)
            bn.num_batches_tracked.add_(k)
    if flat:
        return torch.ops.aten._unsafe_view(y, (n, c, h, w))
    y = y.reshape(b, k, c, h, w).transpose(0, 1).reshape(n, c, h, w)
    return y.contiguous(memory_format=torch.channels_last) if cl else y


def forward_pair(fn, first: tuple, second: tuple, stack: bool):
    """`fn(*first), fn(*second)` — one call after the other, or with `stack` one call on the
    inputs concatenated along the batch inside `stacked(2)`, its output split back (the same
    numbers; `fn`'s BatchNorms must be `StackableBatchNorm2d`)."""
    if not stack:
        return fn(*first), fn(*second)
    with stacked(2):
        out = fn(*(torch.cat((a, b)) for a, b in zip(first, second)))
    return tuple(split_stacked(out, 2))


def split_stacked(out, k: int):
    """A stacked forward's output (a tensor or a tuple of tensors, e.g. DeepLab's
    `(main, aux)`) as the k forwards' outputs: a list of k tensors or k tuples."""
    if isinstance(out, (tuple, list)):
        parts = [t.chunk(k) for t in out]
        return [tuple(p[j] for p in parts) for j in range(k)]
    return list(out.chunk(k))


__all__ = ["StackableBatchNorm2d", "chunked_batch_norm", "forward_pair", "split_stacked",
           "stacked", "stacked_chunks"]
