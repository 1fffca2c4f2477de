"""Reading the outputs of earlier stages (and the release's files) into fresh networks.

An input is either a run directory of `python -m sfc.train` (then `best.pt` or `last.pt` is
taken, as `--select` says; quirk 1: the release always consumes the best) or a checkpoint file:
one written by `sfc` (format `sfc-run-v1`) or one of the release's (`*.pth`), recognised by the
loaders of `sfc.checkpoints`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sfc import checkpoints
from sfc.train.runio import CHECKPOINT_FORMAT, load_checkpoint

# The run that produces each input (for error messages): stage-script paths under exp/.
PRODUCERS = {
    "update": "exp/FlowNet_pretrain/stage_one/script/update.sh (or exp/SFC/stage_one/...)",
    "reference": "exp/FlowNet_pretrain/stage_one/script/reference.sh (or exp/SFC/stage_one/...)",
    "flownet": "exp/FlowNet_pretrain/stage_two/script/train.sh",
    "sfm": "exp/SFM/script/train.sh",
    "chairs": "exp/FlowNet_chairs/script/train.sh",
}


def resolve(path: str | Path, select: str, what: str, allow_unfinished: bool = False) -> Path:
    """Run directory → its `best.pt`/`last.pt`; a file is returned as is. Errors name the
    script that produces the input. A run directory (or a checkpoint inside one) without
    `result.json` has not finished and is refused unless `allow_unfinished`."""
    p = Path(path)
    producer = PRODUCERS.get(what, "an earlier stage")
    if p.is_dir():
        f = p / f"{select}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{what} input {p} has no {select}.pt (is the run finished? "
                                    f"it is produced by {producer})")
    elif p.is_file():
        f = p
    else:
        raise FileNotFoundError(f"{what} input {p} does not exist; it is produced by {producer}")
    run = f.parent
    if (not allow_unfinished and (run / "config.json").is_file()
            and not (run / "result.json").is_file()):
        at = _iteration_of(run / "last.pt")
        raise checkpoints.CheckpointFormatError(
            f"{what} input {run} has not finished (no result.json; last.pt at iteration {at}"
            f" of {_planned_iters(run)}): finish it (run {producer} again, it resumes) or pass "
            "--allow-unfinished to consume it as it is")
    return f


def _iteration_of(path: Path):
    try:
        return load_checkpoint(path, mmap=True)["iter"]
    except (OSError, ValueError, KeyError):  # missing or unreadable last.pt
        return "unknown"


def _planned_iters(run: Path):
    try:
        return json.loads((run / "config.json").read_text())["config"]["iters"]
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _sfc_checkpoint(path: Path) -> dict | None:
    """This project's run checkpoint, or None for anything else `torch.load` reads (the
    release's files); an unreadable file is a CheckpointFormatError naming it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, a JPEG, an arbitrary pickle: name the file
        raise checkpoints.CheckpointFormatError(
            f"{path}: cannot be read as a checkpoint with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            "expected a best.pt/last.pt of `sfc.train` or a release .pth") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    return None


def _describe(ckpt: dict) -> str:
    """What a run checkpoint holds, for error messages."""
    c = ckpt.get("config") or {}
    return (f"a {ckpt.get('stage')!r} run of source {c.get('source')!r} ({c.get('num_classes')} "
            f"classes, layers {c.get('layers')}, width {c.get('width')})")


def _load(model: nn.Module, sd: dict, path: Path, ckpt: dict, what: str) -> None:
    """Strict load with the reason in one line (classes, width, layers) on a mismatch."""
    try:
        checkpoints.load_exact(model, sd, path, what)
    except checkpoints.CheckpointFormatError as e:
        raise checkpoints.CheckpointFormatError(f"{e}; the file holds {_describe(ckpt)}") from None


def _network(ckpt: dict, name: str, path: Path) -> dict:
    models = ckpt["models"]
    if name not in models:
        raise checkpoints.CheckpointFormatError(
            f"{path}: expected a run holding the network {name!r}, found {_describe(ckpt)} "
            f"with networks {sorted(models)}")
    return models[name]


def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def load_segnet_into(model: nn.Module, path: Path) -> str:
    """A stage-one SegNet (`segnet` of an sfc run, or a release file) into a DeepLabV2. A
    single-level model (Accel's `net_ref`/`net_update`) drops the file's `layer5`."""
    ckpt = _sfc_checkpoint(path)
    if ckpt is None:
        checkpoints.load_release_segnet(model, path)
        return f"{path} (release format)"
    sd = _network(ckpt, "segnet", path)
    if not getattr(model, "multi_level", True):
        sd = {k: v for k, v in sd.items() if not k.startswith("layer5.")}
    _load(model, sd, path, ckpt, f"the stage-one SegNet of a {model.num_classes}-class run "
                                 "with this run's --layers/--width")
    return f"{path} (iter {ckpt.get('iter')})"


def load_flownet_into(model: nn.Module, path: Path) -> str:
    """The source-trained FlowNet: `accel.flownet` of a FlowNet_pretrain stage-two run (or a
    release `flownet_source_well_trained.pth`)."""
    ckpt = _sfc_checkpoint(path)
    if ckpt is None:
        checkpoints.load_release_flownet(model, path)
        return f"{path} (release format)"
    _load(model, _sub(_network(ckpt, "accel", path), "flownet."), path, ckpt,
          "the FlowNet of a FlowNet_pretrain stage-two (accel) run")
    return f"{path} (iter {ckpt.get('iter')})"


def load_sfm_into(model: nn.Module, path: Path) -> str:
    """The SFM of an SFM run (or a release `SFM_source_well_trained.pth`)."""
    ckpt = _sfc_checkpoint(path)
    if ckpt is None:
        checkpoints.load_release_flownet(model, path)
        return f"{path} (release format)"
    _load(model, _network(ckpt, "sfm", path), path, ckpt, "the SFM of an SFM run")
    return f"{path} (iter {ckpt.get('iter')})"


def maybe_init(path: str | None, what: str) -> Path | None:
    """`--imagenet-init` / `--chairs-init`: a file, or `none` to keep the random init."""
    if path is None or str(path).lower() == "none":
        return None
    p = Path(path)
    if not p.is_file():
        hint = {"imagenet": "DeepLab_resnet_pretrained_init-f81d91e8.pth or ADVENT's "
                            "DeepLab_resnet_pretrained_imagenet.pth (see README)",
                "chairs": "flownet_flyingchairs_pretrained.pth from the authors' GitHub "
                          "repository's model_weights/ (see README), or a Flying-Chairs run "
                          "of exp/FlowNet_chairs/script/train.sh"}[what]
        raise FileNotFoundError(f"{what} init {p} not found; expected {hint}, or pass "
                                f"--{what}-init none to keep the random init")
    return p


def chairs_init(arg: str | None, select: str = "best", allow_unfinished: bool = False):
    """`--chairs-init`: `none` (None), a Flying-Chairs run directory of `--stage flownet` (its
    best.pt / last.pt), or a file (that run's checkpoint or export, the release's .pth)."""
    if arg is None or str(arg).lower() == "none":
        return None
    if Path(arg).is_dir():
        return resolve(arg, select, "chairs", allow_unfinished)
    return maybe_init(arg, "chairs")


def load_chairs_into(model: nn.Module, path: Path) -> str:
    """A Flying-Chairs FlowNetS into `model`: the `flownet` of a `--stage flownet` run, or a
    bare FlowNetS state dict (its export, the release's `flownet_flyingchairs_pretrained.pth`),
    strict. Returns a description with the file's SHA-256."""
    ckpt = _sfc_checkpoint(path)
    if ckpt is None:
        digest = checkpoints.load_flownet_chairs(model, path)
        return f"{path} (sha256 {digest})"
    _load(model, _network(ckpt, "flownet", path), path, ckpt,
          "the FlowNetS of a Flying-Chairs (--stage flownet) run")
    return f"{path} (iter {ckpt.get('iter')}, sha256 {checkpoints.sha256(path)})"
