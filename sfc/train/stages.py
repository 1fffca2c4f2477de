"""The three stage kinds of the SFC pipeline (method §5); each says only what differs.

| kind   | runs                           | trains                                | monitor |
|--------|--------------------------------|---------------------------------------|---------|
| segnet | FlowNet_pretrain/SFC stage one | DeepLab-v2 multi-level (heads 10×)    | mIoU    |
| accel  | FlowNet_pretrain/SFC stage two | merge, flownet, both layer6 (1 group) | mIoU    |
| sfm    | SFM                            | the SFM (Adam)                        | EPE     |
| flownet| Flying-Chairs FlowNetS (ours)  | a FlowNetS, multi-scale EPE (Adam)    | EPE     |

`sfc_weight > 0` adds the SFC loss on target video (segnet: 0.005, accel: 0.001), for which the
frozen `flownet_global` and SFM are loaded. A stage builds its networks, loads their inits,
declares the optimiser and the LR used at each (0-based) iteration, runs one training step
(source and target losses back-propagated separately; the engine then takes one optimiser
step) and validates.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from sfc import checkpoints, dist, flags, losses
from sfc.evaluate.core import evaluate_accel, evaluate_segnet, evaluate_sfm
from sfc.models import Accel, DeepLabV2, FlowNetS
from sfc.models.stacked import forward_pair
from sfc.train import inputs, optim
from sfc.train.guard import FiniteGuard, NonFiniteLoss, resolve_every

CHAIRS_EXPORT = "flownet_flyingchairs_pretrained.pth"  # the flownet stage's export


class _FlowWatch:
    """Records whether a FlowNet's outputs were finite (forward hook, no sync); `check` hands
    the flags to the guard before the backward pass. Needed because `grid_sample` with border
    padding returns finite values for NaN coordinates on the CPU (a PyTorch bug), so a diverged
    flow passes the loss check and crashes the backward (segmentation fault)."""

    def __init__(self, module: nn.Module, term: str):
        self.term, self.flags = term, []
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out) -> None:
        if torch.is_grad_enabled():
            self.flags.append(~torch.isfinite(out.detach()).all())

    def check(self, guard: FiniteGuard) -> None:
        recorded, self.flags = self.flags, []
        guard.flow(self.term, recorded)


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def stacks_forwards(cfg) -> bool:
    """Whether the run stacks its two target forwards (`--stack-forwards`, sfc.models.stacked):
    asked for, and an SFC stage (BN control included); elsewhere the flag changes nothing."""
    return bool(getattr(cfg, "stack_forwards", False)) and getattr(cfg, "sfc_weight", 0) > 0


class Stage:
    kind = ""
    monitor = "miou"  # or "epe"
    higher_is_better = True
    extra_metrics: tuple[str, ...] = ()  # more numbers of `validate` kept in the results
    main_nets: tuple[str, ...] = ()  # networks saved in best.pt / last.pt

    def __init__(self, cfg, device: torch.device, log=print):
        self.cfg = cfg
        self.device = device
        self.log = log
        self.nets: dict[str, nn.Module] = {}
        self.ddp: dict[str, nn.Module] = {}  # DistributedDataParallel wrappers (several ranks)
        self.sfc = cfg.sfc_weight > 0
        # the control run: the SFC stage's target forwards without its loss (issue 12)
        self.bn_control = bool(getattr(cfg, "bn_control", False)) and self.sfc
        self.stack = stacks_forwards(cfg)
        # the finiteness checks (sfc.train.guard): read at once, or flags on the device
        self.guard = FiniteGuard(device, resolve_every(getattr(cfg, "check_every", "auto"),
                                                       device))

    # -- shared helpers -----------------------------------------------------------------
    def autocast(self):
        if self.cfg.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sfc_autocast(self):
        """The precision of the SFC term's forwards (and so of its backward). Under --amp bf16
        the SFC loss's inputs, the logits of the target forwards, lose most of their gradient
        when the SegNet runs in bf16 (softmax(100 · logits) turns the rounding of the features
        into flipped soft masks: cosine 0.61 to float64 on a trained SegNet, docs/pipeline.md),
        so by default (`--sfc-precision float32`) the SFC term runs in float32 and only the
        source term in bf16; `--sfc-precision autocast` runs it in bf16 too."""
        if getattr(self.cfg, "sfc_precision", "float32") == "autocast":
            return self.autocast()
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _load_frozen_flow_nets(self) -> None:
        """flownet_global (FlowNet_pretrain stage-two FlowNet) and SFM, frozen, eval mode."""
        if self.bn_control:
            self.log("BN control: the target forwards of the SFC loss run, the loss does not "
                     "(flownet_global and the SFM are not loaded)")
            return
        fg, sfm = FlowNetS(), FlowNetS()
        p = inputs.resolve(self.cfg.flownet_ckpt, self.cfg.select, "flownet",
                           self.cfg.allow_unfinished)
        self.log(f"flownet_global <- {inputs.load_flownet_into(fg, p)}")
        p = inputs.resolve(self.cfg.sfm_ckpt, self.cfg.select, "sfm", self.cfg.allow_unfinished)
        self.log(f"SFM <- {inputs.load_sfm_into(sfm, p)}")
        self.nets["flownet_global"] = _frozen(fg)
        self.nets["sfm"] = _frozen(sfm)

    def to(self, device) -> Stage:
        for name, net in self.nets.items():
            net.to(device)
            if self.cfg.channels_last and device.type == "cuda":
                self.nets[name] = net.to(memory_format=torch.channels_last)
        return self

    # -- compiled networks (issue 18) ----------------------------------------------------
    COMPILE_MODES = flags.COMPILE_MODES

    def compile(self, mode: str = "none") -> None:
        """`torch.compile` every network of the stage in place (`nn.Module.compile`: the
        state-dict keys stay those of the eager network, so checkpoints are unchanged). The
        training step's own Python — losses, finiteness checks, the optimiser — stays eager;
        the networks' forward and backward are compiled (BatchNorm, ReLU and residual adds
        fused, fewer kernel launches). "none": eager (the default, and the reference)."""
        if mode in (None, "none"):
            return
        if mode not in self.COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {self.COMPILE_MODES}, got {mode!r}")
        # dynamic=False: one static graph per input size (source and target sizes are fixed;
        # a dynamic-shape graph after the second size would give slower generic kernels)
        kw = {"dynamic": False, **({} if mode == "default" else {"mode": mode})}
        for net in self.compile_units():
            net.compile(**kw)

    def compile_units(self) -> list[nn.Module]:
        """The modules `compile` compiles: every network of the stage."""
        return list(self.nets.values())

    # -- several processes ---------------------------------------------------------------
    def wrap_ddp(self) -> None:
        """Wrap the trained networks in `DistributedDataParallel` (call after loading a resumed
        state: rank 0's parameters and buffers are broadcast once). No buffer sync in the
        forward: each rank's BatchNorm statistics follow its own batches (rank 0's are the ones
        evaluated and saved, see the engine); frozen networks are not wrapped."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # PyTorch >= 2.14: `forward_sync_buffers=False` broadcasts rank 0's buffers at
        # construction and never again (`broadcast_buffers` is deprecated there, and False
        # skips the construction broadcast too); older: `broadcast_buffers=False`, then rank
        # 0's buffers broadcast by hand
        new_api = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        kw = {"forward_sync_buffers": False} if new_api else {"broadcast_buffers": False}
        for name in self.main_nets:
            net = self.nets[name]
            if any(p.requires_grad for p in net.parameters()):
                ids = [self.device] if self.device.type == "cuda" else None
                self.ddp[name] = DDP(net, device_ids=ids, **kw)
        if not new_api:
            self.broadcast_buffers()

    def broadcast_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) to every rank."""
        if dist.get_world_size() > 1:
            for net in self.nets.values():
                for b in net.buffers():
                    torch.distributed.broadcast(b, 0)

    def model(self, name: str) -> nn.Module:
        """What the training step calls: the DDP wrapper of `name` if any, else the network."""
        return self.ddp.get(name, self.nets[name])

    def no_sync(self, name: str, more_backward: bool):
        """Context for a backward pass that another one follows in the same step (the source
        loss before the SFC loss): DDP accumulates locally and reduces once, in the last."""
        if more_backward and name in self.ddp:
            return self.ddp[name].no_sync()
        return contextlib.nullcontext()

    def saved_state(self) -> dict:
        return {k: v.state_dict() for k, v in self.nets.items()}

    def load_saved_state(self, models: dict) -> None:
        for k, v in self.nets.items():
            v.load_state_dict(models[k], strict=True)

    def export(self, run_dir) -> list[tuple[str, str]]:
        """Files written beside result.json when the run finishes: [(what, file name)]."""
        return []

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trained tensor, once each, in the optimiser's order."""
        if getattr(self, "_named", None) is None:
            names = {id(p): n for net in self.nets.values() for n, p in net.named_parameters()}
            seen, self._named = set(), []
            for p in self.trainable_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    self._named.append((names.get(id(p), "?"), p))
        return self._named

    def optimizer_step(self, i: int) -> str | None:
        """The optimiser step of 0-based iteration `i` with the parameter check
        (`FiniteGuard.step`): the name of a non-finite parameter (checks read at once), or
        None."""
        return self.guard.step(self.optimizer, self.named_trainable_parameters(), i)

    def set_iteration_lr(self, i: int) -> float:
        lr = self.lr_at(i)
        optim.set_lr(self.optimizer, lr)
        return lr

    def train_mode(self) -> None:
        """Quirk 2: the trained network is in train mode (BN batch statistics), frozen
        backbones included; flownet_global and the SFM (no BN) stay in eval mode."""
        for name, net in self.nets.items():
            net.train(name in self.main_nets)

    def _sgd(self, groups):
        return optim.make_sgd(groups, lr=self.cfg.lr, momentum=self.cfg.momentum,
                              weight_decay=self.cfg.weight_decay)


class SegNetStage(Stage):
    """Single-frame DeepLab-v2 (multi-level): `CE + 0.1·CE_aux` on source frame t
    [+ sfc_weight · SFC stage-one loss on target frames (t-1, t)]. Poly LR."""

    kind = "segnet"
    main_nets = ("segnet",)

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        net = DeepLabV2(cfg.num_classes, multi_level=True, layers=tuple(cfg.layers),
                        width=cfg.width)
        init = inputs.maybe_init(cfg.imagenet_init, "imagenet")
        if init is not None:
            digest = checkpoints.load_deeplab_init(net, init)
            log(f"segnet <- ImageNet init {init} (sha256 {digest})")
        else:
            log("segnet: random init (--imagenet-init none)")
        net.fp32_heads = self.sfc  # under bf16 autocast: float32 logits for the soft masks
        self.nets["segnet"] = net
        if self.sfc:
            self._load_frozen_flow_nets()
        self.to(device)
        groups = optim.segnet_param_groups(self.nets["segnet"], cfg.lr,
                                           release=cfg.optimizer == "release")
        self.optimizer = self._sgd(groups)

    def lr_at(self, i: int) -> float:
        return optim.poly_lr(i, self.cfg.lr, self.cfg.iters)

    def train_step(self, src: dict, tgt: dict | None) -> dict[str, float]:
        net = self.model("segnet")
        seg = src["seg"]  # (B, 3, T, H, W), SegNet-normalised
        out = {}
        if self.sfc and self.cfg.source_prev_forward:
            # Quirk 7: the release also runs source frame t-1 (output unused); its only effect
            # is one more BN running-statistics update. Kept, under no_grad, and only through
            # the backbone (the classifiers have no BN): the same statistics, exactly.
            with torch.no_grad(), self.autocast():
                self.nets["segnet"].features(seg[:, :, -2])
        with self.no_sync("segnet", more_backward=self.sfc and not self.bn_control):
            with self.autocast():
                l_seg = self.guard.loss("seg", losses.seg_loss(net(seg[:, :, -1]), src["label"]))
            l_seg.backward()
        out["seg"] = self.guard.term(l_seg)
        if self.bn_control:
            # the SFC loss's two target forwards (t-1, then t), train mode, through the backbone
            # only (it holds every BN, as in quirk 7): the same BatchNorm updates; no loss
            with torch.no_grad(), self.sfc_autocast():
                self._target_pair(self.nets["segnet"].features, tgt["seg"])
        elif self.sfc:
            t_seg, t_flow = tgt["seg"], tgt["flow"]
            with self.sfc_autocast():
                lp, lc = self._target_pair(net, t_seg)
                l_sfc = self.guard.loss("sfc", losses.sfc_loss(
                    lp, lc, t_flow[:, :, -2], t_flow[:, :, -1], self.nets["flownet_global"],
                    self.nets["sfm"], scale=self.cfg.scale))
            (self.cfg.sfc_weight * l_sfc).backward()
            out["sfc"] = self.guard.term(l_sfc)
        return out

    def _target_pair(self, net, t_seg: torch.Tensor):
        """`net` on target frames t-1 and t, in this order (their BN statistics move so):
        two forwards, or with `--stack-forwards` one forward of both stacked along the batch
        with per-frame BatchNorm statistics (sfc.models.stacked: the same numbers)."""
        return forward_pair(net, (t_seg[:, :, -2],), (t_seg[:, :, -1],), self.stack)

    def validate(self, loader, progress=True) -> dict:
        return evaluate_segnet(self.nets["segnet"], loader, self.cfg.num_classes,
                               self.cfg.eval_ids, device=self.device, progress=progress,
                               amp=self.cfg.amp)

    @torch.no_grad()
    def predict_logits(self, batch) -> torch.Tensor:
        out = self.nets["segnet"](batch["seg"][:, :, -1])
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def sf_logits_pair(self, batch):
        net = self.nets["segnet"]
        return net(batch["seg"][:, :, -2])[0], net(batch["seg"][:, :, -1])[0]


class AccelStage(Stage):
    """Accel: source CE on frame t from clip (t-1, t) [+ sfc_weight · SFC stage-two loss on the
    3-frame target sample]. One SGD group (merge, flownet, both layer6); warm-up LR with the
    release's ordering (`--warmup-order after` for FlowNet_pretrain, `before` for SFC)."""

    kind = "accel"
    main_nets = ("accel",)

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        accel = Accel(cfg.num_classes, layers=tuple(cfg.layers), width=cfg.width)
        for sub, arg, what in (("net_update", cfg.update_ckpt, "update"),
                               ("net_ref", cfg.reference_ckpt, "reference")):
            if arg is None:
                raise ValueError(f"the accel stage needs --{what}-ckpt (a stage-one run)")
            p = inputs.resolve(arg, cfg.select, what, cfg.allow_unfinished)
            log(f"accel.{sub} <- {inputs.load_segnet_into(getattr(accel, sub), p)}")
        init = inputs.chairs_init(cfg.chairs_init, cfg.select, cfg.allow_unfinished)
        if init is not None:
            log(f"accel.flownet <- Flying Chairs {inputs.load_chairs_into(accel.flownet, init)}")
        else:
            log("accel.flownet: random init (--chairs-init none)")
        optim.freeze_accel_backbones(accel)
        accel.fp32_heads = self.sfc  # under bf16 autocast: float32 logits for the soft masks
        self.flow_watch = _FlowWatch(accel.flownet, "accel.flownet")
        self.nets["accel"] = accel
        if self.sfc:
            self._load_frozen_flow_nets()
        self.to(device)
        self.optimizer = self._sgd(optim.accel_param_groups(self.nets["accel"], cfg.lr))

    def compile_units(self) -> list[nn.Module]:
        """Accel in its parts — both SegNets, its FlowNet, merge — (the warp stays eager):
        compiling them took 25 % less than the whole Accel as one graph (CPU, SFC stage two,
        cold caches: 75 s against 100 s; on an H200 the whole Accel did not finish within
        180 s)."""
        a = self.nets["accel"]
        return [a.net_ref, a.net_update, a.flownet, a.merge] + [
            net for name, net in self.nets.items() if name != "accel"]

    def lr_at(self, i: int) -> float:
        rule = (optim.flownet_pretrain_stage_two_lr if self.cfg.warmup_order == "after"
                else optim.sfc_stage_two_lr)
        return rule(i, self.cfg.lr, self.cfg.warmup_lr, self.cfg.warmup_iters)

    def train_step(self, src: dict, tgt: dict | None) -> dict[str, float]:
        accel = self.model("accel")
        with self.no_sync("accel", more_backward=self.sfc and not self.bn_control):
            with self.autocast():
                logits = accel(src["seg"][:, :, -2:], src["flow"][:, :, -2:])  # (B, C, H, W)
                self.flow_watch.check(self.guard)  # a bad flow is named before the loss it makes
                l_seg = self.guard.loss("seg", losses.seg_loss(logits, src["label"]))
            l_seg.backward()
        out = {"seg": self.guard.term(l_seg)}
        if self.sfc:
            s, f = tgt["seg"], tgt["flow"]  # (B, 3, 3, H, W): frames t-2, t-1, t
            if s.shape[2] != 3:
                raise ValueError(f"SFC stage two needs 3-frame target clips, got {s.shape[2]}")
        if self.bn_control:
            # the SFC loss's two Accel forwards (frame t from (t-1, t), then t-1 from (t-2, t-1))
            with torch.no_grad(), self.sfc_autocast():
                losses.accel_pair(accel, s[:, :, 1:], f[:, :, 1:], s[:, :, :2], f[:, :, :2],
                                  stack=self.stack)
        elif self.sfc:
            with self.sfc_autocast():
                l_sfc = losses.accel_sfc_loss(
                    s[:, :, 1:], f[:, :, 1:], s[:, :, :2], f[:, :, :2], accel,
                    self.nets["flownet_global"], self.nets["sfm"], scale=self.cfg.scale,
                    stack=self.stack)
            self.flow_watch.check(self.guard)
            l_sfc = self.guard.loss("sfc", l_sfc)
            (self.cfg.sfc_weight * l_sfc).backward()
            out["sfc"] = self.guard.term(l_sfc)
        return out

    def validate(self, loader, progress=True) -> dict:
        return evaluate_accel(self.nets["accel"], loader, self.cfg.num_classes,
                              self.cfg.eval_ids, device=self.device, progress=progress,
                              amp=self.cfg.amp)

    @torch.no_grad()
    def predict_logits(self, batch) -> torch.Tensor:
        return self.nets["accel"](batch["seg"][:, :, -2:], batch["flow"][:, :, -2:])


class SFMStage(Stage):
    """SFM pre-training on the source: SFM and flownet_global both start from the FlowNet of
    FlowNet_pretrain stage two; Adam (L2 weight decay), constant LR; monitor source-val EPE."""

    kind = "sfm"
    monitor = "epe"
    higher_is_better = False
    main_nets = ("sfm",)
    extra_metrics = ("epe_zero",)

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        sfm, fg = FlowNetS(), FlowNetS()
        p = inputs.resolve(cfg.flownet_ckpt, cfg.select, "flownet", cfg.allow_unfinished)
        log(f"SFM <- {inputs.load_flownet_into(sfm, p)}")
        log(f"flownet_global <- {inputs.load_flownet_into(fg, p)}")
        self.nets["sfm"] = sfm
        self.nets["flownet_global"] = _frozen(fg)
        self.to(device)
        self.optimizer = optim.make_adam(self.nets["sfm"].parameters(), lr=cfg.lr,
                                         weight_decay=cfg.weight_decay)

    def lr_at(self, i: int) -> float:
        return optim.constant_lr(i, self.cfg.lr)

    def train_step(self, src: dict, tgt: dict | None) -> dict[str, float]:
        f = src["flow"]  # (B, 3, T, H, W), flow-normalised
        with self.autocast():
            loss = self.guard.loss("sfm", losses.sfm_loss(
                f[:, :, -2], f[:, :, -1], src["label_prev"], src["label"],
                self.nets["flownet_global"], self.model("sfm"), gt_down4x=src["label_down4x"],
                num_classes=self.cfg.num_classes))
        loss.backward()
        return {"sfm": self.guard.term(loss)}

    def validate(self, loader, progress=True) -> dict:
        return evaluate_sfm(self.nets["sfm"], self.nets["flownet_global"], loader,
                            device=self.device, progress=progress, amp=self.cfg.amp)


class FlowNetStage(Stage):
    """Flying-Chairs pre-training of a FlowNetS (docs/flow.md): the multi-scale EPE of flow2 …
    flow6 against the ground truth / 20 (`losses.multiscale_epe`), Adam (weight decay on the
    weights only), LR halved at 1/3, 1/2, 2/3 of the run. Validated by EPE on the val split
    (lower is better), with the zero-flow baseline and Fl-all beside it. The weights keep the
    FlowNetS keys: `--chairs-init` of the accel stage takes the run (or its exported .pth)."""

    kind = "flownet"
    monitor = "epe"
    higher_is_better = False
    main_nets = ("flownet",)
    extra_metrics = ("epe_zero", "fl_all", "fl_all_zero")

    def __init__(self, cfg, device, log=print):
        super().__init__(cfg, device, log)
        net = FlowNetS()
        init = inputs.chairs_init(cfg.chairs_init, cfg.select, cfg.allow_unfinished)
        if init is not None:
            log(f"flownet <- {inputs.load_chairs_into(net, init)} (fine-tuning)")
        else:
            net.reset_parameters_flownet()
            log("flownet: random init (Kaiming normal, slope 0.1, zero biases: the FlowNet "
                "training init)")
        self.nets["flownet"] = net  # a NaN flow makes a NaN loss (no warp): the loss check
        self.to(device)
        self.optimizer = optim.make_flownet_adam(self.nets["flownet"], lr=cfg.lr,
                                                 weight_decay=cfg.weight_decay)

    def lr_at(self, i: int) -> float:
        return optim.multistep_lr(i, self.cfg.lr, self.cfg.iters)

    def train_step(self, src: dict, tgt: dict | None) -> dict[str, float]:
        x = torch.cat((src["img1"], src["img2"]), 1)  # (B, 6, H, W): flow of img1 into img2
        with self.autocast():
            pyr = self.model("flownet")(x, pyramid=True)  # flow2 … flow6, px / 20
            loss = self.guard.loss("flow", losses.multiscale_epe(pyr, src["flow_gt"]))
        loss.backward()
        return {"flow": self.guard.term(loss)}

    def export(self, run_dir) -> list[tuple[str, str]]:
        """The best FlowNetS as a bare state dict in the release's key layout (the file
        `flownet_flyingchairs_pretrained.pth` the release loads), for `--chairs-init`."""
        from sfc.train.runio import atomic_save, load_checkpoint

        best = load_checkpoint(Path(run_dir) / "best.pt")
        atomic_save(best["models"]["flownet"], Path(run_dir) / CHAIRS_EXPORT)
        return [(f"FlowNetS of iteration {best['iter']} (best val EPE)", CHAIRS_EXPORT)]

    def validate(self, loader, progress=True) -> dict:
        from sfc.evaluate.flow import evaluate_flow

        return evaluate_flow(self.nets["flownet"], loader, device=self.device,
                             progress=progress, amp=self.cfg.amp)


STAGES = {"segnet": SegNetStage, "accel": AccelStage, "sfm": SFMStage,
          "flownet": FlowNetStage}


def build_stage(cfg, device, log=print) -> Stage:
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; expected one of {sorted(STAGES)}")
    return STAGES[cfg.stage](cfg, device, log)


__all__ = ["NonFiniteLoss", "STAGES", "Stage", "build_stage"]
