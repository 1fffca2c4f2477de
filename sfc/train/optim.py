"""Optimisers and learning-rate rules of the SFC release (method §3.1, §5, quirks 3 and 11).

* `RepeatedSGD`: SGD (momentum, L2 weight decay, no dampening, no Nesterov) in which each
  parameter may carry a repeat count k: one `step()` applies the single-tensor SGD update k
  times, exactly as `torch.optim.SGD(foreach=False)` does when a tensor is listed k times
  (method §3.1). With all counts 1 it is plain SGD — the "clean" optimiser.
* LR rules, each a function of the 0-based iteration i giving the LR *used by the step of
  iteration i*:
  - `poly_lr`: `base · (1 − i/max_iters)^0.9` (stage-one SegNets, set before the step);
  - `flownet_pretrain_stage_two_lr`: the release sets the LR *after* each step, so iteration 0
    runs at the optimiser's initial 5e-4, iterations 1–1000 at 5e-5, then 5e-4 (quirk 3);
  - `sfc_stage_two_lr`: set *before* each step: iterations 0–999 at 5e-5, then 5e-4;
  - constant (Adam of the SFM stage).
"""

from __future__ import annotations

import torch
from torch import nn

POLY_POWER = 0.9


# ---- learning-rate rules (i = 0-based iteration) -------------------------------------------
def poly_lr(i: int, base_lr: float, max_iters: int, power: float = POLY_POWER) -> float:
    """The release's `lr_poly`: `base · (1 − i/max_iters)^power`, set before step i."""
    return base_lr * ((1.0 - float(i) / max_iters) ** power)


def flownet_pretrain_stage_two_lr(i: int, lr: float = 5e-4, warmup_lr: float = 5e-5,
                                  warmup_iters: int = 1000) -> float:
    """FlowNet_pretrain stage two. The release assigns the LR *after* `optimizer.step()` (quirk
    3): step 0 runs at the initial LR `lr`; after step j (< warmup_iters) it sets `warmup_lr`, after
    later steps `lr`. So steps 1..warmup_iters (1-based iterations 2–1001) use `warmup_lr`."""
    if 1 <= i <= warmup_iters:
        return warmup_lr
    return lr


def sfc_stage_two_lr(i: int, lr: float = 5e-4, warmup_lr: float = 5e-5,
                     warmup_iters: int = 1000) -> float:
    """SFC stage two: LR set *before* each step; steps 0..warmup_iters-1 (1-based 1–1000) use
    `warmup_lr`, then `lr`."""
    return warmup_lr if i < warmup_iters else lr


def constant_lr(i: int, lr: float) -> float:
    return lr


def multistep_lr(i: int, lr: float, max_iters: int, fractions=(1 / 3, 1 / 2, 2 / 3),
                 gamma: float = 0.5) -> float:
    """The Flying-Chairs FlowNetS schedule: `lr` halved at 1/3, 1/2 and 2/3 of the run (the
    common PyTorch FlowNet code: 300 epochs of 1000 iterations, halved at epochs 100, 150,
    200), set before step i."""
    drops = sum(i >= round(f * max_iters) for f in fractions)
    return lr * gamma ** drops


# ---- SGD with per-parameter repeat counts --------------------------------------------------
class RepeatedSGD(torch.optim.Optimizer):
    """SGD whose parameter groups carry a `repeats` list (one int >= 1 per parameter).

    For a parameter p with repeat count k, gradient g (fixed during the step), lr η, momentum m
    and weight decay λ (method §3.1):
      * first step (no momentum buffer): k times { d = g + λ·p; p ← p − η·d }; buffer ← last d;
      * later steps: k times { d = g + λ·p; B ← m·B + d; p ← p − η·B }.
    This is what PyTorch's single-tensor SGD does with a parameter listed k times (each copy
    reads the same momentum-buffer state at the start of the step; the first step clones one
    buffer per copy and keeps the last). Written out here so it neither relies on PyTorch
    internals nor on duplicate parameters, which PyTorch deprecates.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 foreach: bool | None = None):
        # foreach: multi-tensor kernels (same operations in the same order per element; ~4
        # launches per repeat round instead of ~4 per parameter per repeat). None = on CUDA.
        self.foreach = foreach
        # a captured step (sfc.train.graphed): one 0-d LR tensor per group, filled by `set_lr`
        self.lr_tensors: list[torch.Tensor] | None = None
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, repeats=None)
        super().__init__(params, defaults)
        for group in self.param_groups:
            reps = group["repeats"]
            if reps is None:
                group["repeats"] = [1] * len(group["params"])
            elif len(reps) != len(group["params"]) or min(reps, default=1) < 1:
                raise ValueError("each parameter group needs one repeat count >= 1 per "
                                 f"parameter; got {len(reps)} counts for "
                                 f"{len(group['params'])} parameters")
            else:
                group["repeats"] = [int(r) for r in reps]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            live = [(p, k) for p, k in zip(group["params"], group["repeats"])
                    if p.grad is not None]
            if not live:
                continue
            if self.lr_tensors is not None:
                self._group_step_foreach(group, live, self.lr_tensors[gi])
                continue
            foreach = self.foreach if self.foreach is not None else live[0][0].is_cuda
            (self._group_step_foreach if foreach else self._group_step)(group, live)
        return loss

    def use_lr_tensors(self) -> None:
        """For a captured step (`--cuda-graph`, sfc.train.graphed): each group's LR is read from
        a 0-d float32 tensor on its parameters' device, which `set_lr` fills, instead of being
        baked into the kernels as a number (a replayed graph would keep the LR of its capture).
        The multi-tensor path then updates `p − (lr·d)`, rounding `lr·d` first, where the
        number path computes `p + (−lr)·d` in one kernel: equal within float32 rounding, not
        bit-identical. The tensors are not part of `state_dict` (checkpoints unchanged)."""
        self.lr_tensors = [torch.tensor(float(g["lr"]), dtype=torch.float32,
                                        device=g["params"][0].device)
                           for g in self.param_groups]

    def _group_step(self, group, live) -> None:
        """Single-tensor path: PyTorch's `SGD(foreach=False)` loop, k times per parameter."""
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p, k in live:
            g = p.grad
            state = self.state[p]
            buf = state.get("momentum_buffer")
            first = buf is None
            for _ in range(k):
                d = g.add(p, alpha=wd) if wd != 0 else g.clone()  # fresh tensor
                if m != 0:
                    if first:
                        buf = d  # first step: each listed copy starts its own buffer
                    else:
                        buf.mul_(m).add_(d)
                        d = buf
                p.add_(d, alpha=-lr)
            if m != 0:
                state["momentum_buffer"] = buf  # the last copy's buffer is the one kept

    def _group_step_foreach(self, group, live, lr_t: torch.Tensor | None = None) -> None:
        """Multi-tensor path: round r updates every parameter whose count k exceeds r (`lr_t`:
        the group's LR tensor, `use_lr_tensors`)."""
        lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
        first = [(p, k) for p, k in live if "momentum_buffer" not in self.state[p]]
        later = [(p, k) for p, k in live if "momentum_buffer" in self.state[p]]
        last_d = {}
        for r in range(max(k for _, k in live)):
            for plist, is_first in ((first, True), (later, False)):
                ps = [p for p, k in plist if k > r]
                if not ps:
                    continue
                gs = [p.grad for p in ps]
                d = (torch._foreach_add(gs, ps, alpha=wd) if wd != 0
                     else [g.clone() for g in gs])
                if m != 0:
                    if is_first:
                        last_d.update(zip(ps, d))  # the last repeat's d becomes the buffer
                    else:
                        bufs = [self.state[p]["momentum_buffer"] for p in ps]
                        torch._foreach_mul_(bufs, m)
                        torch._foreach_add_(bufs, d)
                        d = bufs
                if lr_t is None:
                    torch._foreach_add_(ps, d, alpha=-lr)
                else:
                    torch._foreach_sub_(ps, torch._foreach_mul(d, lr_t))
        for p, _ in first:
            if m != 0:
                self.state[p]["momentum_buffer"] = last_d[p]


# ---- building the optimiser of a stage -----------------------------------------------------
def segnet_param_groups(segnet: nn.Module, lr: float, release: bool) -> list[dict]:
    """Stage-one SegNet groups: trainable backbone at `lr`, classifiers (`layer5`, `layer6`) at
    10·lr. `release=True` gives the backbone tensors the release's repeat counts (297×3, 12×4,
    conv1.weight×1 for ResNet-101; method §3.1), `False` counts each once."""
    if release:
        triples = segnet.release_param_repeats()
        backbone = [p for _, p, _ in triples]
        repeats = [k for _, _, k in triples]
    else:
        backbone = segnet.backbone_parameters()
        repeats = [1] * len(backbone)
    heads = segnet.classifier_parameters()
    return [
        {"params": backbone, "lr": lr, "repeats": repeats, "lr_mult": 1.0, "name": "backbone"},
        {"params": heads, "lr": 10 * lr, "repeats": [1] * len(heads), "lr_mult": 10.0,
         "name": "classifiers"},
    ]


def accel_trainable_modules(accel: nn.Module) -> list[tuple[str, nn.Module]]:
    """What trains in both Accel stages (method §3.4): merge, flownet, both layer6."""
    return [("merge", accel.merge), ("flownet", accel.flownet),
            ("net_ref.layer6", accel.net_ref.layer6),
            ("net_update.layer6", accel.net_update.layer6)]


def freeze_accel_backbones(accel: nn.Module) -> None:
    """Freeze everything in the Accel except merge, flownet and both layer6 (requires_grad)."""
    for p in accel.parameters():
        p.requires_grad_(False)
    for _, mod in accel_trainable_modules(accel):
        for p in mod.parameters():
            p.requires_grad_(True)


def accel_param_groups(accel: nn.Module, lr: float) -> list[dict]:
    """One group, no 10× (the release's Accel optimiser)."""
    params = [p for _, mod in accel_trainable_modules(accel) for p in mod.parameters()]
    return [{"params": params, "lr": lr, "repeats": [1] * len(params), "lr_mult": 1.0,
             "name": "accel"}]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's LR to `lr × group['lr_mult']` (10× classifier heads keep their ratio),
    and the group's LR tensor where the optimiser has them (`RepeatedSGD.use_lr_tensors`; a
    fill on the device, no sync)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    for g, t in zip(optimizer.param_groups, getattr(optimizer, "lr_tensors", None) or ()):
        t.fill_(g["lr"])


def make_sgd(groups: list[dict], lr: float, momentum: float = 0.9,
             weight_decay: float = 5e-4, foreach: bool | None = None) -> RepeatedSGD:
    return RepeatedSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                       foreach=foreach)


def make_adam(params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 4e-4) -> torch.optim.Adam:
    """The SFM optimiser: Adam with weight decay added to the gradient as L2 (not AdamW)."""
    groups = [{"params": list(params), "lr": lr, "lr_mult": 1.0, "name": "sfm"}]
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def make_flownet_adam(net: torch.nn.Module, lr: float = 1e-4, betas=(0.9, 0.999),
                      weight_decay: float = 4e-4) -> torch.optim.Adam:
    """The Flying-Chairs FlowNetS optimiser (common PyTorch FlowNet code): Adam, weight decay
    (L2, added to the gradient) on the weights, none on the biases."""
    weights = [p for n, p in net.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in net.named_parameters() if n.endswith("bias")]
    groups = [{"params": weights, "weight_decay": weight_decay, "lr_mult": 1.0,
               "name": "weights"},
              {"params": biases, "weight_decay": 0.0, "lr_mult": 1.0, "name": "biases"}]
    return torch.optim.Adam(groups, lr=lr, betas=betas)
