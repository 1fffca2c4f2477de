"""The five stage kinds of the benchmark, built from the project's real training code.

Each bench stage is a `sfc.train.stages` object made by `build_stage` from a config that
`sfc.train`'s own parser resolves (the flags the `exp/` scripts pass), so the benchmark times
exactly `Stage.train_step` plus the optimiser step as `sfc.train.engine` runs them:
    train_mode → set LR → zero_grad(set_to_none) → train_step(src, tgt) → optimizer_step(i)
(the step with its parameter check; `--check-every` decides whether the checks are read at once
or stay on the device, sfc.train.guard).
Inputs that the real stages read from earlier runs (stage-one SegNets, the stage-two FlowNet,
the SFM) are random-init networks written to a temporary folder in the release's file formats.
Batches are synthetic tensors of the dataset items' shapes (method §2), already on the device.

| bench kind | release run (method §5)      | stage  | sfc weight | source clip     | target clip |
|------------|----------------------------|--------|------------|-----------------|-------------|
| segnet     | FlowNet_pretrain stage one | segnet | 0          | 2 frames        | —           |
| segnet_sfc | SFC stage one              | segnet | 0.005      | 2 frames        | 2 frames    |
| accel      | FlowNet_pretrain stage two | accel  | 0          | 2 frames        | —           |
| accel_sfc  | SFC stage two              | accel  | 0.001      | 2 frames        | 3 frames    |
| sfm        | SFM                        | sfm    | —          | 2 frames+labels | —           |
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sfc.models import DeepLabV2, FlowNetS
from sfc.train import stages

KINDS = ("segnet", "segnet_sfc", "accel", "accel_sfc", "sfm")
# bench kind → (sfc.train --stage, SFC weight of the paper's script)
KIND_STAGE = {"segnet": ("segnet", 0.0), "segnet_sfc": ("segnet", 0.005),
              "accel": ("accel", 0.0), "accel_sfc": ("accel", 0.001), "sfm": ("sfm", 0.0)}
# bench kind → which sample size its source / target (or validation) clips have
USES_TARGET = {"segnet": False, "segnet_sfc": True, "accel": False, "accel_sfc": True,
               "sfm": False}
NUM_CLASSES = 15  # VIPER → Cityscapes
# bench kinds whose step `--stack-forwards` changes: the SFC stages (sfc.train.stages.
# stacks_forwards), whose two target forwards it stacks
STACKING_KINDS = tuple(k for k, (_, sfc_weight) in KIND_STAGE.items() if sfc_weight > 0)


@dataclass
class BenchConfig:
    device: str = "cpu"
    source_size: tuple[int, int] = (256, 128)  # (W, H) PIL order, as the datasets take it
    target_size: tuple[int, int] = (256, 128)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    layers: tuple[int, int, int, int] = (3, 4, 23, 3)
    width: int = 64
    channels_last: bool = False  # the engine's --channels-last (applied on CUDA only)
    foreach_sgd: bool = False  # proposed multi-tensor RepeatedSGD (sfc.bench.fastopt)
    compile: str = "none"  # the engine's --compile (torch.compile of the networks)
    source_prev_forward: bool = True  # SFC stage one's unused source forward (quirk 7)
    check_every: str = "auto"  # the engine's --check-every (finiteness checks, sfc.train.guard)
    cuda_graph: bool = False  # the engine's --cuda-graph (sfc.train.graphed; not the SFM)
    stack_forwards: bool = False  # the engine's --stack-forwards (SFC kinds; sfc.models.stacked)
    val_batch_size: int = 1  # the engine's --val-batch-size (validation clips per batch)
    seed: int = 0


def train_args(kind: str, bc: BenchConfig, ckpt_dir: Path) -> list[str]:
    """The `python -m sfc.train` flags of this bench kind (as the exp/ scripts spell them)."""
    stage, w = KIND_STAGE[kind]
    a = ["--stage", stage, "--out", str(ckpt_dir / "run"), "--device", bc.device,
         "--source-size", *map(str, bc.source_size), "--target-size", *map(str, bc.target_size),
         "--layers", *map(str, bc.layers), "--width", str(bc.width),
         "--amp", "bf16" if bc.precision == "bf16" else "none", "--seed", str(bc.seed),
         "--num-workers", "0", "--check-every", str(bc.check_every)]
    if bc.channels_last:
        a.append("--channels-last")
    if bc.stack_forwards:
        a.append("--stack-forwards")
    if stage == "segnet":
        a += ["--imagenet-init", "none", "--iters", "120000" if w else "80000"]
    if stage == "accel":
        a += ["--chairs-init", "none", "--update-ckpt", str(ckpt_dir / "segnet_update.pth"),
              "--reference-ckpt", str(ckpt_dir / "segnet_reference.pth"),
              "--iters", "160000" if w else "80000"]
    if stage == "sfm" or w:
        a += ["--flownet-ckpt", str(ckpt_dir / "flownet.pth")]
    if w:
        a += ["--sfc-weight", str(w), "--sfm-ckpt", str(ckpt_dir / "sfm.pth")]
    if not bc.source_prev_forward:
        a.append("--no-source-prev-forward")
    return a


def write_input_checkpoints(ckpt_dir: Path, bc: BenchConfig) -> None:
    """Random-init stand-ins for the earlier runs' outputs, in the release's file formats
    (bare state dicts, read by `sfc.checkpoints.load_release_*`)."""
    g = torch.Generator().manual_seed(bc.seed)
    for name in ("segnet_update", "segnet_reference"):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        net = DeepLabV2(NUM_CLASSES, multi_level=True, layers=tuple(bc.layers), width=bc.width)
        torch.save(net.state_dict(), ckpt_dir / f"{name}.pth")
    for name in ("flownet", "sfm"):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        torch.save(FlowNetS().state_dict(), ckpt_dir / f"{name}.pth")


def build(kind: str, bc: BenchConfig, ckpt_dir: Path | None = None, log=lambda s: None):
    """The real `sfc.train.stages` stage of this bench kind (inputs written to `ckpt_dir`, or a
    temporary folder removed afterwards)."""
    from sfc.train import build_parser, resolve  # the real flag parsing and defaults

    if kind not in KINDS:
        raise ValueError(f"unknown bench stage {kind!r}; expected one of {KINDS}")
    with tempfile.TemporaryDirectory(prefix="sfc-bench-") as tmp:
        d = Path(ckpt_dir) if ckpt_dir is not None else Path(tmp)
        if not (d / "sfm.pth").is_file():
            write_input_checkpoints(d, bc)
        cfg = resolve(build_parser().parse_args(train_args(kind, bc, d)))
        torch.manual_seed(bc.seed)
        stage = stages.build_stage(cfg, torch.device(bc.device), log=log)
        stage.compile(bc.compile)
    if bc.foreach_sgd and kind != "sfm":  # the SFM's Adam is PyTorch's own
        from sfc.bench.fastopt import use_foreach_sgd

        use_foreach_sgd(stage)
    return stage


# ---- synthetic batches (shapes of the dataset items, method §2; batch 1) --------------------
def _labels(n: int, hw, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """(n, H, W) int64 blocky labels (16×16-pixel cells) with every class and some ignore."""
    h, w = hw
    cells = torch.randint(-1, num_classes, (n, 1, (h + 15) // 16, (w + 15) // 16), generator=g)
    k = min(num_classes, cells.numel())
    cells.view(-1)[:k] = torch.arange(k)  # every class present (where there are enough cells)
    up = torch.nn.functional.interpolate(cells.float(), size=(h, w), mode="nearest")
    return up[:, 0].long()


def _clip(frames: int, size, g: torch.Generator) -> dict:
    w, h = size
    flow = torch.rand(1, 3, frames, h, w, generator=g)  # BGR / 255
    seg = flow * 255.0 - torch.tensor([104.0, 116.7, 122.7]).view(1, 3, 1, 1, 1)
    return {"seg": seg, "flow": flow}


def make_batches(kind: str, bc: BenchConfig, seed: int = 0) -> tuple[dict, dict | None]:
    """(source batch, target batch or None) on the device, as the engine hands them over."""
    g = torch.Generator().manual_seed(seed)
    w, h = bc.source_size
    src = _clip(2, bc.source_size, g)
    src["label"] = _labels(1, (h, w), NUM_CLASSES, g)
    if kind == "sfm":
        src["label_prev"] = _labels(1, (h, w), NUM_CLASSES, g)
        src["label_down4x"] = _labels(1, ((h + 3) // 4, (w + 3) // 4), NUM_CLASSES, g)
    tgt = None
    if USES_TARGET[kind]:
        tgt = _clip(3 if kind == "accel_sfc" else 2, bc.target_size, g)
    dev = torch.device(bc.device)
    move = lambda b: {k: v.to(dev) for k, v in b.items()}  # noqa: E731
    return move(src), (move(tgt) if tgt is not None else None)


def make_val_items(kind: str, bc: BenchConfig, n: int, seed: int = 1) -> list[dict]:
    """`n` validation items (CPU tensors, unbatched) of the stage's val set: Cityscapes val
    clips at the target size, VIPER val clips with both labels at the source size (SFM)."""
    g = torch.Generator().manual_seed(seed)
    size = bc.source_size if kind == "sfm" else bc.target_size
    w, h = size
    items = []
    for i in range(n):
        it = {k: v[0] for k, v in _clip(2, size, g).items()}
        it["label"] = _labels(1, (h, w), NUM_CLASSES, g)[0]
        if kind == "sfm":
            it["label_prev"] = _labels(1, (h, w), NUM_CLASSES, g)[0]
        it["name"] = f"bench_{i}"
        items.append(it)
    return items


def capturable(kind: str) -> bool:
    """Whether the engine's `--cuda-graph` captures this bench kind's stage (not the SFM)."""
    from sfc.train import graphed

    return KIND_STAGE[kind][0] in graphed.STAGES


def graph_runner(kind: str, stage, bc: BenchConfig):
    """The engine's `--cuda-graph` runner for this stage (None: eager, or a stage the engine
    does not capture). On the CPU (the script's dry run) the graph is emulated
    (`graphed.TapeBackend`): the plumbing runs, the timing means nothing."""
    if not bc.cuda_graph or not capturable(kind):
        return None
    from sfc.train import graphed

    cpu = torch.device(bc.device).type != "cuda"
    return graphed.GraphedStep(stage, backend=graphed.TapeBackend() if cpu else None)


def graph_label(runner, device) -> bool | str:
    """A row's `cuda_graph`: False (eager), True (a CUDA graph) or "emulated" (the CPU)."""
    if runner is None:
        return False
    return True if torch.device(device).type == "cuda" else "emulated"


def train_iteration(stage, src: dict, tgt: dict | None, i: int = 0,
                    phases: dict | None = None, runner=None) -> dict[str, float]:
    """One training iteration exactly as `sfc.train.engine.Trainer.run` performs it (one process).
    `phases`: if given, gets the synchronised seconds of the optimiser step under "opt_s".
    `runner`: a `graph_runner` (the optimiser step is inside the graph: no "opt_s")."""
    stage.train_mode()
    stage.set_iteration_lr(i)
    if runner is not None:
        return runner(i, (src, tgt))
    stage.optimizer.zero_grad(set_to_none=True)
    terms = stage.train_step(src, tgt)
    if phases is None:
        stage.optimizer_step(i)  # with the parameter check, as the engine
        return terms
    dev = stage.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    stage.optimizer_step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    phases.setdefault("opt_s", []).append(time.perf_counter() - t0)
    return terms
