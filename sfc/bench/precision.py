"""How much of the SFC gradient survives reduced precision (issue 17, item 6).

The SFC stage-one loss reaches the SegNet through `softmax(100 · logits)`: a rounding of the
logits by a few hundredths flips the soft masks, so its gradient is the part of training most
sensitive to precision. This measures, on a *trained* SegNet with BatchNorm in train mode (as
in the SFC stages) and target clips of the data root, the cosine between the gradient of the
SFC loss with respect to the SegNet's parameters computed

* in float32 (the default),
* under bf16 autocast with the classifier heads in float32 (what the SFC stages run),
* under bf16 autocast with bf16 heads (for comparison),
* in float32 with TF32 convolutions, emulated (`tf32_convolutions`): what CUDA computes on an
  Ampere or newer GPU by default, since PyTorch lets cuDNN use TF32 unless `--tf32 off`,

and the same gradient in float64 (the reference). CPU autocast stands in for CUDA's (both run
convolutions and matmuls in bf16, reductions in float32).

TF32 emulation: a TF32 tensor-core convolution rounds its two operands to TF32 (10 explicit
mantissa bits instead of float32's 23; nearest, ties away from zero, as the `cvt.rna.tf32`
conversion) and accumulates in float32. Every convolution and transposed convolution of the
SegNet, `flownet_global` and the SFM runs here on its input and weight so rounded; its output
gradient is rounded the same way on the way back, so the two backward convolutions (input and
weight gradients) also see TF32 operands (the saved forward operands are the rounded ones).
Accumulation order and cuDNN's algorithm choice are not emulated; the classifiers run as
convolutions (not the CPU's GEMM form), as on CUDA.

    python -m sfc.bench.precision --segnet RUN --flownet RUN --sfm RUN --data ROOT \\
        --size 128 64 --clips 8 [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys

import torch
import torch.nn.functional as F

from sfc import losses
from sfc.models.aspp_gemm import aspp_impl

MODES = ("float32", "bf16 (float32 heads)", "bf16 (bf16 heads)", "tf32 convolutions (emulated)")


TF32_ROUNDINGS = ("nearest", "truncate")


def to_tf32(x: torch.Tensor, rounding: str = "nearest") -> torch.Tensor:
    """`x` (float32) rounded to TF32, 10 mantissa bits: "nearest" with ties away from zero (the
    magnitude's bit pattern plus half a TF32 unit, then truncated: `cvt.rna.tf32.f32`), or
    "truncate" (toward zero: what a kernel that feeds float32 words straight to the tensor
    cores gets; which one cuDNN's kernels do is not documented)."""
    if x.dtype != torch.float32:
        raise ValueError(f"to_tf32 takes float32, got {x.dtype}")
    if rounding not in TF32_ROUNDINGS:
        raise ValueError(f"rounding must be one of {TF32_ROUNDINGS}, got {rounding!r}")
    bits = x.view(torch.int32)
    if rounding == "nearest":
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


class _RoundGrad(torch.autograd.Function):
    """Identity forward; rounds the gradient to TF32 backward (the output gradient a TF32
    backward convolution reads)."""

    @staticmethod
    def forward(ctx, x, rounding):
        ctx.rounding = rounding
        return x.clone()  # not a view: the networks modify some outputs in place

    @staticmethod
    def backward(ctx, g):
        return to_tf32(g.contiguous(), ctx.rounding), None


def _tf32_operand(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """The TF32 value forward, the gradient passed straight through backward."""
    return x + (to_tf32(x.detach().contiguous(), rounding) - x).detach()


class tf32_convolutions(torch.overrides.TorchFunctionMode):
    """Inside: every `conv2d` / `conv_transpose2d` call computes with TF32 operands (module
    docstring), rounded as `to_tf32(rounding)`. Float32 tensors only; others pass unchanged."""

    CONVS = (torch.conv2d, torch.conv_transpose2d)

    def __init__(self, rounding: str = "nearest"):
        super().__init__()
        self.rounding = rounding

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CONVS and args[0].dtype == torch.float32:
            x, w, *rest = args
            r = self.rounding
            return _RoundGrad.apply(
                func(_tf32_operand(x, r), _tf32_operand(w, r), *rest, **kwargs), r)
        return func(*args, **kwargs)


def sfc_gradient(segnet, flownet_global, sfm, t_seg, t_flow, mode: str,
                 scale: float = 100.0, tf32_rounding: str = "nearest") -> torch.Tensor:
    """d(SFC stage-one loss)/d(SegNet parameters), flattened to float64. `mode`: "float64",
    or one of MODES. The networks are copied (BatchNorm in train mode updates only the copy's
    statistics): the SegNet in train mode, the frozen flow networks in eval mode."""
    dtype = torch.float64 if mode == "float64" else torch.float32
    net = copy.deepcopy(segnet).to(dtype).train()
    fg = copy.deepcopy(flownet_global).to(dtype).eval()
    sm = copy.deepcopy(sfm).to(dtype).eval()
    for p in (*fg.parameters(), *sm.parameters()):
        p.requires_grad_(False)
    net.fp32_heads = mode == "bf16 (float32 heads)"
    if mode.startswith("bf16"):
        amp = torch.autocast("cpu", dtype=torch.bfloat16)
    elif mode.startswith("tf32"):
        amp = contextlib.ExitStack()
        amp.enter_context(aspp_impl("conv"))  # the classifiers as convolutions, as on CUDA
        amp.enter_context(tf32_convolutions(tf32_rounding))
    else:
        amp = contextlib.nullcontext()
    seg, flow = t_seg.to(dtype), t_flow.to(dtype)
    with amp:
        lp = net(seg[:, :, -2])
        lc = net(seg[:, :, -1])
        loss = losses.sfc_loss(lp, lc, flow[:, :, -2], flow[:, :, -1], fg, sm, scale=scale)
    loss.backward()
    return torch.cat([p.grad.detach().double().flatten() for p in net.parameters()
                      if p.grad is not None])


def measure(segnet, flownet_global, sfm, clips, modes=MODES,
            tf32_rounding: str = "nearest") -> dict:
    """Per clip and averaged: the cosine of each mode's gradient to the float64 one, and the
    relative norm of the difference."""
    per = []
    for item in clips:
        seg, flow = item["seg"][None], item["flow"][None]
        ref = sfc_gradient(segnet, flownet_global, sfm, seg, flow, "float64")
        row = {"name": item.get("name")}
        for mode in modes:
            g = sfc_gradient(segnet, flownet_global, sfm, seg, flow, mode,
                             tf32_rounding=tf32_rounding)
            row[mode] = {"cosine": float(F.cosine_similarity(g, ref, dim=0)),
                         "rel_error": float((g - ref).norm() / ref.norm().clamp(min=1e-300))}
        per.append(row)
    summary = {m: {"cosine_mean": sum(r[m]["cosine"] for r in per) / len(per),
                   "cosine_min": min(r[m]["cosine"] for r in per),
                   "rel_error_mean": sum(r[m]["rel_error"] for r in per) / len(per)}
               for m in modes}
    return {"clips": len(per), "per_clip": per, "summary": summary,
            "tf32_rounding": tf32_rounding}


def _load(run, which: str):
    from sfc.evaluate.checkpoint import build_model, inspect_checkpoint, load_flownet, resolve_run

    if which == "segnet":
        info = inspect_checkpoint(resolve_run(run), "segnet")
        return build_model(info), info.num_classes
    net, _ = load_flownet(run, which)
    return net


def main(argv=None) -> int:
    from sfc import flags
    from sfc.data import DATASET_DIRS, CityscapesSeq

    p = argparse.ArgumentParser(prog="python -m sfc.bench.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--segnet", required=True, help="a trained SegNet run or checkpoint")
    p.add_argument("--flownet", required=True,
                   help="FlowNet_pretrain stage-two run (its FlowNet is flownet_global)")
    p.add_argument("--sfm", required=True, help="SFM run")
    p.add_argument("--data", required=True, help="data root holding Cityscapes/")
    p.add_argument("--size", type=int, nargs=2, default=(128, 64), metavar=("W", "H"))
    p.add_argument("--clips", type=int, default=8, help="target train clips (t-1, t)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                   help="which precisions to compare with float64 (default: all)")
    p.add_argument("--tf32-rounding", choices=list(TF32_ROUNDINGS), default="nearest",
                   help="how the emulated TF32 rounds float32 operands: nearest (ties away, "
                        "cvt.rna) or truncate (toward zero)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        torch.manual_seed(0)
        segnet, classes = _load(args.segnet, "segnet")
        fg, sm = _load(args.flownet, "flownet"), _load(args.sfm, "sfm")
        ds = CityscapesSeq(f"{args.data}/{DATASET_DIRS['cityscapes']}", split="train",
                           frames=2, size=tuple(args.size), classes=classes)
        clips = [ds[i] for i in range(min(args.clips, len(ds)))]
        res = measure(segnet, fg, sm, clips, tuple(args.modes), args.tf32_rounding)
    except flags.BAD_INPUT as e:
        return flags.report("sfc.bench.precision", e)
    res.update(size=list(args.size), segnet=str(args.segnet))
    print(f"SFC stage-one gradient vs float64 over {res['clips']} target clips "
          f"({args.size[0]}x{args.size[1]}, SegNet in train mode):")
    for mode, s in res["summary"].items():
        if mode.startswith("tf32"):
            mode += f", {args.tf32_rounding}"
        print(f"  {mode:<22} cosine mean {s['cosine_mean']:.6f}  min {s['cosine_min']:.6f}  "
              f"relative error {s['rel_error_mean']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
