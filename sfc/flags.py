"""Up-front checks of command-line flags, shared by ``sfc.train``, ``sfc.evaluate`` and
``sfc.predict``: numbers in range, a device that exists, outputs that can be written. Each
failure is a :class:`FlagError` whose message names the flag, what was given and what is
expected; the commands print it as one line and exit 2 before any work starts.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from pathlib import Path

import torch

from sfc.checkpoints import CheckpointFormatError
from sfc.data.io import DatasetError

MIN_SIZE = 8  # pixels: a smaller side leaves the 1/8 feature maps below one pixel


# `--compile` of sfc.train and sfc.bench (torch.compile modes; none: eager)
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


class FlagError(ValueError):
    """A flag value that cannot work."""


# Bad input that every command reports as one line naming the file or flag (exit 2), never a
# traceback: a flag out of range, a checkpoint of the wrong kind, a dataset file, a missing file.
BAD_INPUT = (FlagError, CheckpointFormatError, DatasetError, FileNotFoundError)


def one_line(error: Exception) -> str:
    """The error's own message. A DataLoader worker's exception comes back with the worker's
    traceback in its message ("Caught DatasetError in DataLoader worker process 0. Original
    Traceback ..."): keep only the original message, the same line as with 0 workers."""
    msg = str(error)
    if "Original Traceback" in msg:
        pat = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception): (.*)$")
        last = [m.group(1) for ln in msg.strip().splitlines() if (m := pat.match(ln.strip()))]
        if last:
            return last[-1]
    return msg


def is_rank_zero() -> bool:
    """True unless torchrun started this process as a rank other than 0 (`RANK`)."""
    return os.environ.get("RANK", "0") in ("", "0")


def report(prog: str, error: Exception) -> int:
    """Print `prog: error: ...` on stderr (one line, also for a loader worker's error; once
    per job: rank 0 only under torchrun); returns the exit status 2."""
    if is_rank_zero():
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return 2


def quiet_off_rank_zero(parser):
    """An argparse parser that prints its usage errors on rank 0 only (every rank still exits
    2): a bad flag under torchrun is one line, not one per process."""
    if not is_rank_zero():
        parser._print_message = lambda message, file=None: None
    return parser


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_number(args, name: str, low=None, high=None, low_open=False, high_open=False,
                 allow_none=True) -> None:
    """``args.<name>`` is a finite number in [low, high] (``*_open``: the bound excluded)."""
    v = getattr(args, name)
    if v is None and allow_none:
        return
    want = []
    if low is not None:
        want.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        want.append(f"{'<' if high_open else '<='} {high}")
    ok = v is not None and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        raise FlagError(f"{_flag(name)} {v}: expected a number {' and '.join(want)}")


def check_ints(args, name: str, low: int) -> None:
    """Every entry of the list flag ``args.<name>`` (e.g. ``--layers``) is an int >= low."""
    v = getattr(args, name)
    if v is not None and any(int(x) < low for x in v):
        raise FlagError(f"{_flag(name)} {' '.join(map(str, v))}: every value must be >= {low}")


def check_size(args, name: str) -> None:
    """``args.<name>`` is (W, H) with both sides >= MIN_SIZE."""
    v = getattr(args, name)
    if v is not None and min(int(x) for x in v) < MIN_SIZE:
        raise FlagError(f"{_flag(name)} {' '.join(map(str, v))}: width and height must be "
                        f">= {MIN_SIZE} pixels")


def check_device(device: str | None) -> None:
    """``None`` (auto), ``cpu``, ``cuda`` or ``cuda:N`` of a device that exists here."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise FlagError(f"--device {device!r}: not a device ({e}); expected cpu, cuda or "
                        "cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise FlagError(f"--device {device}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise FlagError(f"--device {device}: no CUDA device is available here "
                        "(torch.cuda.is_available() is False); use --device cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise FlagError(f"--device {device}: this machine has {n} CUDA device(s), "
                        f"cuda:0 .. cuda:{n - 1}")


def check_writable_dir(path, flag: str, create: bool = True) -> Path:
    """Prove the folder ``path`` writable with a probe file: created if needed, or with
    ``create=False`` probed in its nearest existing parent (nothing left behind — for commands
    whose later checks may still refuse the job)."""
    p = Path(path)
    blocker = next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise FlagError(f"{flag} {p}: cannot write there ({blocker} is a file, not a folder)")
    try:
        if create:
            p.mkdir(parents=True, exist_ok=True)
        where = p if p.is_dir() else next(q for q in p.parents if q.is_dir())
        with tempfile.NamedTemporaryFile(dir=where, prefix=".sfc-write-probe-"):
            pass
    except OSError as e:
        raise FlagError(f"{flag} {p}: cannot write there ({e.strerror or e})") from None
    return p


def check_writable_file(path, flag: str) -> Path:
    """The file ``path`` can be written: its folder exists or can be made, and takes a file;
    an existing ``path`` must be a file."""
    p = Path(path)
    if p.is_dir():
        raise FlagError(f"{flag} {p}: is a folder; expected a file name")
    try:
        check_writable_dir(p.parent if str(p.parent) else Path(os.curdir), flag)
    except FlagError as e:
        raise FlagError(f"{flag} {p}: cannot write its folder "
                        f"({str(e).split('(', 1)[-1]}") from None
    return p
