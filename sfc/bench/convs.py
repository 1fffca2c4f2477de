"""The backbone's dilated 3×3 convolutions, native against space-to-batch (`--dilated-impl`).

    python -m sfc.bench.convs --device cuda [--json convs.json]   # faithful sizes
    python -m sfc.bench.convs --device cpu --scale 0.125          # quick check of the script

DeepLab-v2's ResNet-101 runs 23 dilated 3×3 convolutions in `layer3` (256 channels, dilation 2)
and 3 in `layer4` (512 channels, dilation 4) per forward, on features at 1/8 of the input:
160×90 for a 1280×720 VIPER frame, 128×64 for a 1024×512 Cityscapes one. This times one such
convolution, batch 1, each way (`sfc.models.dilated`): the forward alone (the frozen backbones of
the Accel stages) and forward + backward with input and weight gradients (the SegNet stages),
in float32 (TF32 as PyTorch's defaults, recorded), optionally float32 with TF32 off
(`fp32-strict`: what `--tf32 off` costs a convolution) and bfloat16, and checks that both ways
give
the same output (relative error, printed). The last column extrapolates to one SegNet forward
(23 + 3 convolutions); a SegNet stage runs 1–3 backbone forwards (+ backward) per iteration,
an Accel stage 2–6 forwards.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from sfc.bench import measure
from sfc.models.dilated import s2b_conv2d

# (name, input W×H, channels, dilation, convolutions per SegNet forward)
SHAPES = (
    ("layer3 source", (1280, 720), 256, 2, 23),
    ("layer3 target", (1024, 512), 256, 2, 23),
    ("layer4 source", (1280, 720), 512, 4, 3),
    ("layer4 target", (1024, 512), 512, 4, 3),
)
DTYPES = {"fp32": torch.float32, "fp32-strict": torch.float32, "bf16": torch.bfloat16}


def _conv(mode: str, d: int):
    if mode == "s2b":
        return lambda x, w: s2b_conv2d(x, w, None, d)
    return lambda x, w: F.conv2d(x, w, None, padding=d, dilation=d)


def _time_mode(conv, x, wt, go, device, iters: int, warmup: int):
    """(output, forward ms, forward + backward ms) of one way of computing the convolution."""
    xg, wg = x.clone().requires_grad_(), wt.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return conv(x, wt)

    def fwd_bwd():
        xg.grad = wg.grad = None
        conv(xg, wg).backward(go)

    out = fwd().float()
    f = 1e3 * measure.median(measure.time_calls(fwd, iters, warmup, device))
    fb = 1e3 * measure.median(measure.time_calls(fwd_bwd, iters, warmup, device))
    return out, f, fb


def measure_shape(device: torch.device, size, channels: int, d: int, dtype: torch.dtype,
                  iters: int, warmup: int) -> dict:
    """Median ms of the forward and of forward + backward, native and s2b, and the relative
    difference of their outputs."""
    w_in, h_in = size
    h, w = -(-h_in // 8), -(-w_in // 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, h, w, generator=g).to(device, dtype)
    wt = (torch.randn(channels, channels, 3, 3, generator=g) * 0.02).to(device, dtype)
    go = torch.randn(1, channels, h, w, generator=g).to(device, dtype)
    out, rec = {}, {"features": [h, w]}
    for mode in ("native", "s2b"):
        out[mode], rec[f"{mode}_fwd_ms"], rec[f"{mode}_fwd_bwd_ms"] = _time_mode(
            _conv(mode, d), x, wt, go, device, iters, warmup)
    rec["rel_diff"] = float((out["s2b"] - out["native"]).norm() / out["native"].norm())
    return rec


def run(device: torch.device, scale: float = 1.0, iters: int = 10, warmup: int = 3,
        dtypes=("fp32", "bf16"), log=print) -> dict:
    rows = []
    for prec in dtypes:
        for name, size, ch, d, per_fwd in SHAPES:
            size = tuple(max(8 * d, int(round(s * scale))) for s in size)
            ch = max(8, int(round(ch * min(1.0, scale * 4))))
            old = torch.backends.cudnn.allow_tf32
            if prec == "fp32-strict":  # --tf32 off: float32 convolutions without TF32
                torch.backends.cudnn.allow_tf32 = False
            try:
                rec = measure_shape(device, size, ch, d, DTYPES[prec], iters, warmup)
            finally:
                torch.backends.cudnn.allow_tf32 = old
            rec.update(name=name, precision=prec, input_size=list(size), channels=ch,
                       dilation=d, per_segnet_forward=per_fwd)
            rows.append(rec)
            log(f"[convs] {name} {prec}: native {rec['native_fwd_ms']:.3f} / "
                f"{rec['native_fwd_bwd_ms']:.3f} ms, s2b {rec['s2b_fwd_ms']:.3f} / "
                f"{rec['s2b_fwd_bwd_ms']:.3f} ms (forward / forward + backward)")
    meta = {"device": str(device), "torch": torch.__version__, "scale": scale, "iters": iters,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
            "tf32_conv": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}
    return {"meta": meta, "rows": rows}


def table(res: dict) -> str:
    head = ("| convolution | precision | features H×W×C | native fwd ms | s2b fwd ms | native "
            "fwd+bwd ms | s2b fwd+bwd ms | fwd+bwd speed-up | per SegNet forward saved, ms "
            "(fwd / fwd+bwd) | rel. diff |")
    lines = [head, "|" + "---|" * 10]
    for r in res["rows"]:
        n = r["per_segnet_forward"]
        lines.append(
            f"| {r['name']} (×{n}) | {r['precision']} | {r['features'][0]}×{r['features'][1]}"
            f"×{r['channels']} d{r['dilation']} | {r['native_fwd_ms']:.3f} | "
            f"{r['s2b_fwd_ms']:.3f} | {r['native_fwd_bwd_ms']:.3f} | {r['s2b_fwd_bwd_ms']:.3f}"
            f" | {r['native_fwd_bwd_ms'] / r['s2b_fwd_bwd_ms']:.2f}× | "
            f"{n * (r['native_fwd_ms'] - r['s2b_fwd_ms']):.2f} / "
            f"{n * (r['native_fwd_bwd_ms'] - r['s2b_fwd_bwd_ms']):.2f} | "
            f"{r['rel_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sfc.bench.convs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (as the engine sets it)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="input sizes × this (channels too, below 0.25): a quick CPU check")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precisions", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"],
                   help="fp32 (TF32 convolutions as PyTorch's default), fp32-strict (TF32 "
                        "off: what --tf32 off costs), bf16")
    p.add_argument("--json", default=None, help="write the results here (and a .md table)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    res = run(device, args.scale, args.iters, args.warmup, dtypes=tuple(args.precisions))
    text = table(res)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        with open(args.json.removesuffix(".json") + ".md", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
