"""Reading the outputs of earlier stages (and the release's files) into fresh networks.

An input is either a run directory of `python -m sfc.train` (then `best.pt` or `last.pt` is
taken, as `--select` says; quirk 1: the release always consumes the best) or a checkpoint file:
one written by `sfc` (format `sfc-run-v1`) or one of the release's (`*.pth`), recognised by the
loaders of `sfc.checkpoints`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sfc import checkpoints
from sfc.train.runio import CHECKPOINT_FORMAT

# The run that produces each input (for error messages): stage-script paths under exp/.
PRODUCERS = {
    "update": "exp/FlowNet_pretrain/stage_one/script/update.sh (or exp/SFC/stage_one/...)",
    "reference": "exp/FlowNet_pretrain/stage_one/script/reference.sh (or exp/SFC/stage_one/...)",
    "flownet": "exp/FlowNet_pretrain/stage_two/script/train.sh",
    "sfm": "exp/SFM/script/train.sh",
}


def resolve(path: str | Path, select: str, what: str) -> Path:
    """Run directory → its `best.pt`/`last.pt`; a file is returned as is. Errors name the
    script that produces the input."""
    p = Path(path)
    producer = PRODUCERS.get(what, "an earlier stage")
    if p.is_dir():
        f = p / f"{select}.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{what} input {p} has no {select}.pt (is the run finished? "
                                    f"it is produced by {producer})")
        return f
    if not p.is_file():
        raise FileNotFoundError(f"{what} input {p} does not exist; it is produced by {producer}")
    return p


def _sfc_checkpoint(path: Path) -> dict | None:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    return None


def _network(ckpt: dict, name: str, path: Path) -> dict:
    models = ckpt["models"]
    if name not in models:
        raise checkpoints.CheckpointFormatError(
            f"{path} (stage {ckpt.get('stage')!r}) holds networks {sorted(models)}, "
            f"expected {name!r}")
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
    model.load_state_dict(sd, strict=True)
    return f"{path} (iter {ckpt.get('iter')})"


def load_flownet_into(model: nn.Module, path: Path) -> str:
    """The source-trained FlowNet: `accel.flownet` of a FlowNet_pretrain stage-two run (or a
    release `flownet_source_well_trained.pth`)."""
    ckpt = _sfc_checkpoint(path)
    if ckpt is None:
        checkpoints.load_release_flownet(model, path)
        return f"{path} (release format)"
    model.load_state_dict(_sub(_network(ckpt, "accel", path), "flownet."), strict=True)
    return f"{path} (iter {ckpt.get('iter')})"


def load_sfm_into(model: nn.Module, path: Path) -> str:
    """The SFM of an SFM run (or a release `SFM_source_well_trained.pth`)."""
    ckpt = _sfc_checkpoint(path)
    if ckpt is None:
        checkpoints.load_release_flownet(model, path)
        return f"{path} (release format)"
    model.load_state_dict(_network(ckpt, "sfm", path), strict=True)
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
                          "repository's model_weights/ (see README)"}[what]
        raise FileNotFoundError(f"{what} init {p} not found; expected {hint}, or pass "
                                f"--{what}-init none to keep the random init")
    return p
