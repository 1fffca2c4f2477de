"""Which network a checkpoint holds, and building it for evaluation.

Accepted (method §5, §8 quirk 10 — every file is read with ``torch.load(weights_only=True)``):
* this project's run checkpoints (``best.pt`` / ``last.pt`` of ``python -m sfc.train``:
  ``{"format": "sfc-run-v1", "stage", "iter", "models": {"accel" | "segnet" | ...: state
  dict}, "config"}``), Accel or single-frame SegNet runs; also ``{"model": sd, "config"}``;
* the release's Accel state dict (SFC stage two ``best.pth``; its ``flownet_global``/SFM keys
  are ignored) → :func:`sfc.checkpoints.load_release_accel`;
* the release's stage-one SegNets (``segnet.``-prefixed wrapper or bare keys, with or without
  ``layer5``) → :func:`sfc.checkpoints.load_release_segnet`.

The architecture (mode, classes, ``layers``, ``width``, multi-level) is read from the weights
themselves, so a tiny test model and the paper's ResNet-101 load the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from sfc.checkpoints import (
    CheckpointFormatError,
    load_release_accel,
    load_release_segnet,
    state_dict_of,
)

# The SegNet's main classifier (first ASPP branch): weight (C, 32·width, 3, 3).
_HEAD = "layer6.conv2d_list.0.weight"
SOURCE_CLASSES = {"viper": 15, "synthia_seq": 12}


@dataclass
class CheckpointInfo:
    path: str
    fmt: str              # "sfc" (this project) or "release"
    mode: str             # "accel" or "segnet"
    prefix: str           # key prefix of the network inside the state dict ("" if none)
    num_classes: int
    layers: tuple[int, int, int, int]
    width: int
    multi_level: bool
    config: dict          # the run config ({} for release files)
    meta: dict            # "iteration", "which" (best / last / release) for the report
    state_dict: dict = field(default=None, repr=False)  # flat; freed by build_model


def _raw(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointFormatError(f"{path}: cannot read with torch.load(weights_only=True) "
                                    f"({type(e).__name__}: {e})") from e


def _segnet_prefix(sd: dict, candidates) -> str | None:
    for p in candidates:
        if f"{p}conv1.weight" in sd and f"{p}{_HEAD}" in sd:
            return p
    return None


def _arch(sd: dict, prefix: str, path: str) -> tuple[tuple[int, ...], int, int, bool]:
    """(layers, width, num_classes, multi_level) of the DeepLab-v2 under ``prefix``."""
    layers = []
    for k in range(1, 5):
        pat = re.compile(rf"^{re.escape(prefix)}layer{k}\.(\d+)\.")
        idx = {int(m.group(1)) for key in sd if (m := pat.match(key))}
        if not idx:
            raise CheckpointFormatError(f"{path}: no '{prefix}layer{k}.N.' keys — not a "
                                        "DeepLab-v2 ResNet SegNet")
        layers.append(max(idx) + 1)
    width = int(sd[f"{prefix}conv1.weight"].shape[0])
    num_classes = int(sd[f"{prefix}{_HEAD}"].shape[0])
    multi = f"{prefix}layer5.conv2d_list.0.weight" in sd
    return tuple(layers), width, num_classes, multi


def _flat_state_dict(path: str, obj) -> tuple[dict, str, dict, dict]:
    """(flat state dict, format, config, meta) of a loaded checkpoint object.

    This project's run checkpoints (``sfc.train.runio``: ``{"format": "sfc-run-v1", "stage", "iter",
    "models": {net_name: state_dict}, "config", ...}``) are flattened to ``net_name.key``;
    ``{"model": state_dict, "config": ...}`` dicts and bare state dicts are taken as they are.
    """
    config, meta, fmt = {}, {}, "release"
    stem = os.path.splitext(os.path.basename(path))[0]
    if isinstance(obj, dict) and isinstance(obj.get("models"), dict):
        fmt, config = "sfc", dict(obj.get("config") or {})
        meta["iteration"] = obj.get("iter")
        meta["stage"] = obj.get("stage", config.get("stage"))
        sd = {}
        for name, sub in obj["models"].items():
            if not isinstance(sub, dict):
                raise CheckpointFormatError(f"{path}: 'models'[{name!r}] is not a state dict")
            sd.update({f"{name}.{k}": v for k, v in sub.items()})
        bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
        if bad:
            raise CheckpointFormatError(f"{path}: non-tensor entries {bad[:5]}")
    else:
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "config" in obj:
            fmt, config = "sfc", dict(obj.get("config") or {})
            meta["iteration"] = obj.get("iteration", obj.get("iter"))
        sd = state_dict_of(obj, path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    meta["which"] = stem if fmt == "sfc" and stem in ("best", "last") else fmt
    return sd, fmt, config, meta


def inspect_checkpoint(path, mode: str | None = None) -> CheckpointInfo:
    """Identify the network in ``path``. ``mode`` (``accel``/``segnet``) forces the choice
    when the file could hold both."""
    path = os.fspath(path)
    sd, fmt, config, meta = _flat_state_dict(path, _raw(path))
    accel_p = next((p for p in ("", "accel.", "model.")
                    if f"{p}net_update.{_HEAD}" in sd and f"{p}merge.weight" in sd), None)
    segnet_p = _segnet_prefix(sd, ("", "segnet.", "model."))
    if mode is None:
        mode = "accel" if accel_p is not None else ("segnet" if segnet_p is not None else None)
    if mode == "accel" and accel_p is None:
        raise CheckpointFormatError(
            f"{path}: --mode accel needs an Accel state dict ('net_ref.', 'net_update.', "
            "'merge.', 'flownet.' keys); " + _found(sd))
    if mode == "segnet" and segnet_p is None:
        raise CheckpointFormatError(
            f"{path}: --mode segnet needs a DeepLab-v2 SegNet ('conv1.weight', '{_HEAD}', "
            "optionally 'segnet.'-prefixed); " + _found(sd))
    if mode is None:
        raise CheckpointFormatError(
            f"{path}: neither an Accel nor a SegNet checkpoint (an SFM/FlowNet checkpoint "
            "has no segmentation to evaluate); " + _found(sd))
    prefix = accel_p if mode == "accel" else segnet_p
    net = f"{prefix}net_update." if mode == "accel" else prefix
    layers, width, num_classes, multi = _arch(sd, net, path)
    if mode == "accel":
        multi = False
    return CheckpointInfo(path, fmt, mode, prefix, num_classes, layers, width, multi, config,
                          meta, sd)


def _found(sd: dict) -> str:
    heads = sorted({k.split(".", 1)[0] for k in sd})
    return f"found top-level key prefixes {heads[:8]}"


def check_classes(info: CheckpointInfo, source: str) -> None:
    """The checkpoint's classifier must have the source protocol's number of classes."""
    if source not in SOURCE_CLASSES:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCE_CLASSES)}")
    want = SOURCE_CLASSES[source]
    if info.num_classes != want:
        other = {v: k for k, v in SOURCE_CLASSES.items()}.get(info.num_classes)
        hint = f"; pass --source {other}" if other else ""
        raise CheckpointFormatError(
            f"{info.path}: the checkpoint's classifier has {info.num_classes} classes, but "
            f"--source {source} evaluates the {want}-class protocol{hint}")


def build_model(info: CheckpointInfo, layers=None, width=None) -> torch.nn.Module:
    """Construct the network of ``info`` (``layers``/``width`` override the inferred ones) and
    load the weights strictly. The classifier heads run in float32 under bf16 autocast when the
    checkpoint comes from an SFC stage, as that run's validation did."""
    from sfc.models import Accel, DeepLabV2

    layers = tuple(layers) if layers is not None else info.layers
    width = int(width) if width is not None else info.width
    if info.mode == "accel":
        model = Accel(info.num_classes, layers=layers, width=width)
    else:
        model = DeepLabV2(info.num_classes, multi_level=info.multi_level, layers=layers,
                          width=width)
    sd, info.state_dict = info.state_dict, None
    p = info.prefix
    if info.fmt == "release" and all(k.startswith(p) for k in sd):
        if info.mode == "accel":
            load_release_accel(model, info.path)
        else:
            load_release_segnet(model, info.path)
        return model
    sub = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)} if p else sd
    if info.mode == "accel":
        keep = ("net_ref.", "net_update.", "merge.", "flownet.")
    else:
        keep = tuple(n + "." for n, _ in model.named_children())
    sub = {k: v for k, v in sub.items() if k.startswith(keep)}
    for k, v in model.state_dict().items():  # BN counters absent from old files
        if k.endswith("num_batches_tracked") and k not in sub:
            sub[k] = v
    try:
        model.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise CheckpointFormatError(f"{info.path}: weights do not fit a {info.mode} with "
                                    f"layers={layers}, width={width}, {info.num_classes} "
                                    f"classes: {str(e).splitlines()[0]} …") from e
    # under bf16 autocast, the heads in the precision of the run's own validation: float32
    # for the SFC stages (their soft masks), autocast otherwise
    model.fp32_heads = float((info.config or {}).get("sfc_weight") or 0) > 0
    return model


FLOW_NETWORKS = ("flownet", "flownet_global", "sfm")


def resolve_run(path, select: str = "best") -> str:
    """A run directory of ``python -m sfc.train`` → its ``best.pt`` (or ``last.pt``); a file
    path is returned as it is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        f = os.path.join(path, f"{select}.pt")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{path} is a folder without {select}.pt; expected a run "
                                    "directory of python -m sfc.train or a checkpoint file")
        return f
    return path


def load_flownet(path, network: str | None = None) -> tuple[torch.nn.Module, str]:
    """A FlowNetS from any file (or run directory) the project reads → (net, which): which
    names the network taken, e.g. ``"accel.flownet (…/best.pt)"``.

    ``network``: ``flownet`` — the optical-flow FlowNet: an Accel's (``accel.flownet.`` /
    release ``flownet.``), a Flying-Chairs run's (``flownet.``) or a bare FlowNetS state dict
    (the release's ``flownet_flyingchairs_pretrained.pth``, ``flownet_source_well_trained.pth``);
    ``flownet_global`` — the frozen global FlowNet inside an SFM or SFC run; ``sfm`` — the
    segmentation-to-flow module. None: ``flownet``, else ``flownet_global``; an SFM is never
    taken unless asked for (it does not compute optical flow from frames)."""
    from sfc.models import FlowNetS

    path = resolve_run(path)
    sd, _, _, _ = _flat_state_dict(path, _raw(path))
    key = "conv1.0.weight"
    found = {k[: -len(key)] for k in sd if k.endswith(key)}

    def kind(prefix: str) -> str:
        last = prefix.rstrip(".").rsplit(".", 1)[-1] if prefix else ""
        return {"flownet_global": "flownet_global", "sfm": "sfm"}.get(last, "flownet")

    if network is not None and network not in FLOW_NETWORKS:
        raise ValueError(f"network must be one of {FLOW_NETWORKS}, got {network!r}")
    order = [network] if network else ["flownet", "flownet_global"]
    p = next((q for want in order for q in sorted(found, key=len) if kind(q) == want), None)
    if p is None:
        have = sorted(kind(q) for q in found)
        hint = ("; it holds only an SFM (segmentation-to-flow): pass 'sfm' explicitly to use "
                "it" if have == ["sfm"] else "")
        raise CheckpointFormatError(
            f"{path}: no {' or '.join(order)} FlowNetS weights ('…conv1.0.weight'); found "
            f"{have or 'none'}{hint}; expected a Flying-Chairs or FlowNet_pretrain stage-two "
            "run, an SFM/SFC run, or a FlowNetS state dict; " + _found(sd))
    net = FlowNetS()
    sub = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    try:
        net.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise CheckpointFormatError(f"{path}: the weights under {p!r} are not a FlowNetS: "
                                    f"{str(e).splitlines()[0]}") from e
    return net.eval(), f"{p.rstrip('.') or 'FlowNetS state dict'} ({path})"
