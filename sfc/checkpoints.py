"""Loaders for foreign checkpoint formats, one named function each (method §3.1, §3.2, §5).

Every loader reads with `torch.load(weights_only=True, map_location='cpu')`, loads with
`strict=True` semantics (every model key must come from the file, shapes must match; only
BatchNorm `num_batches_tracked` counters, absent from old files, may keep the model's value) and
returns the file's SHA-256 (hex) for the run log. A file that does not fit raises
`CheckpointFormatError` naming the file, the expected format and the first offending keys.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

_SHOW = 5  # how many offending keys an error lists
_ACCEL_SUBMODULES = ("net_ref", "net_update", "merge", "flownet")


class CheckpointFormatError(ValueError):
    """A checkpoint file that does not match the expected format."""


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Read a state dict (tensors only) from `path`; unwraps `{'state_dict': …}`/`{'model': …}`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling/zip errors: name the file and the expectation
        raise CheckpointFormatError(
            f"{path}: cannot read as a PyTorch state dict with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return state_dict_of(obj, path)


def state_dict_of(obj, path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded object: unwraps `{'state_dict': …}`/`{'model': …}` and
    checks that it is a non-empty dict of name → tensor (`path` only names the file in errors)."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointFormatError(f"{path}: expected a non-empty dict of tensors (a state "
                                    f"dict), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointFormatError(f"{path}: expected a state dict of name → tensor; "
                                    f"non-tensor entries: {_first(bad)}")
    return dict(obj)


def _first(keys) -> str:
    keys = sorted(map(str, keys))
    more = f" … (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def _strip(sd: dict, prefix: str) -> dict:
    """Strip `prefix` from the keys that carry it, if any key does (others stay and so show up
    as unexpected keys)."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    return sd


def load_exact(model: nn.Module, sd: dict, path, fmt: str, keep=()) -> None:
    """Load `sd` into `model` with strict semantics; `keep`: key prefixes the file must not hold
    and the model keeps from its init. Raises CheckpointFormatError on any mismatch."""
    target = model.state_dict()
    optional = {k for k in target if k.endswith("num_batches_tracked")}
    kept = {k for k in target if k.startswith(keep)} if keep else set()
    missing = [k for k in target if k not in sd and k not in optional | kept]
    unexpected = [k for k in sd if k not in target or k in kept]
    msg = f"{path}: does not match the expected format ({fmt})"
    if missing or unexpected:
        parts = [msg]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected)}")
        raise CheckpointFormatError("; ".join(parts))
    wrong = [k for k in sd if sd[k].shape != target[k].shape]
    if wrong:
        k = sorted(wrong)[0]
        hint = ""
        if ".conv2d_list." in k or k.startswith("merge."):
            hint = (f" — the classifier has {sd[k].shape[0]} classes in the file, "
                    f"{target[k].shape[0]} in the model")
        raise CheckpointFormatError(
            f"{msg}; shape mismatch for {len(wrong)} keys, first {k}: file "
            f"{tuple(sd[k].shape)} vs model {tuple(target[k].shape)}{hint}")
    target.update(sd)
    model.load_state_dict(target, strict=True)


def _finish(path, what: str) -> str:
    digest = sha256(path)
    log.info("loaded %s from %s (sha256 %s)", what, path, digest)
    return digest


def load_deeplab_init(model: nn.Module, path) -> str:
    """DeepLab-v2 ImageNet/COCO init (`DeepLab_resnet_pretrained_init-f81d91e8.pth` or ADVENT's
    `DeepLab_resnet_pretrained_imagenet.pth`) into a `DeepLabV2`. method §3.1: the one leading key
    component (`Scale.`) is stripped, keys whose second component is `layer5` (the file's own
    classifier) are skipped; the model's `layer5`/`layer6` keep their init. Returns the SHA-256.
    """
    sd = read_state_dict(path)
    fmt = "DeepLab-v2 init: keys 'Scale.conv1.weight', 'Scale.layer1.0.conv1.weight', …"
    heads = {k.split(".", 1)[0] for k in sd}
    if len(heads) != 1 or any("." not in k for k in sd):
        raise CheckpointFormatError(f"{path}: expected one common leading key component "
                                    f"({fmt}); found {_first(heads)}")
    sd = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[1] != "layer5"}
    load_exact(model, sd, path, fmt, keep=("layer5.", "layer6."))
    return _finish(path, "DeepLab-v2 init")


def load_flownet_chairs(model: nn.Module, path) -> str:
    """Flying Chairs FlowNetS (`flownet_flyingchairs_pretrained.pth`), strict. method §3.2."""
    sd = read_state_dict(path)
    load_exact(model, sd, path, "FlowNetS state dict: 'conv1.0.weight', 'predict_flow2.weight', …")
    return _finish(path, "Flying Chairs FlowNetS")


def load_release_segnet(model: nn.Module, path) -> str:
    """A SegNet checkpoint of the release into a `DeepLabV2`: the whole stage-one wrapper
    (`segnet.`-prefixed keys) or a bare state dict, with or without `layer5`. A single-level
    model drops the file's `layer5` (how the release builds Accel from stage-one checkpoints);
    a multi-level model requires it. A leading `module.` (DataParallel) is stripped.
    """
    sd = _strip(_strip(read_state_dict(path), "module."), "segnet.")
    fmt = "DeepLab-v2 SegNet: 'segnet.conv1.weight', … or bare 'conv1.weight', …"
    if not getattr(model, "multi_level", True):
        sd = {k: v for k, v in sd.items() if not k.startswith("layer5.")}
    load_exact(model, sd, path, fmt)
    return _finish(path, "release SegNet")


def load_release_flownet(model: nn.Module, path) -> str:
    """A bare FlowNetS state dict written by the release (e.g. the stage-two FlowNet or the
    SFM: `flownet_source_well_trained.pth`, `SFM_source_well_trained.pth`), strict."""
    sd = _strip(read_state_dict(path), "module.")
    load_exact(model, sd, path, "FlowNetS state dict: 'conv1.0.weight', 'predict_flow2.weight', …")
    return _finish(path, "release FlowNetS")


def load_release_accel(model: nn.Module, path) -> str:
    """A full Accel state dict (`net_ref.`, `net_update.`, `merge.`, `flownet.` keys). Other
    top-level prefixes (the SFC stage-two `best.pth` also holds `flownet_global` and the SFM)
    are ignored; every Accel key is required. A leading `module.` is stripped."""
    sd = _strip(read_state_dict(path), "module.")
    ignored = sorted({k.split(".", 1)[0] for k in sd} - set(_ACCEL_SUBMODULES))
    sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] in _ACCEL_SUBMODULES}
    if ignored:
        log.info("%s: ignoring non-Accel prefixes %s", path, ", ".join(ignored))
    load_exact(model, sd, path, "Accel state dict: 'net_ref.conv1.weight', 'merge.weight', "
                                 "'flownet.conv1.0.weight', …")
    return _finish(path, "release Accel")
