"""Run-directory I/O: atomic checkpoints, config with code version, logs, RNG state.

Layout of a run directory (rank 0 writes everything):
  config.json    resolved configuration + code version
  log.txt        human-readable log (also printed)
  metrics.jsonl  one JSON object per logged event (train losses, evaluations)
  tb/            TensorBoard events (scalars, images at each evaluation)
  last.pt        everything to resume (written atomically at each evaluation and on a signal)
  best.pt        networks at the best monitored value (strict improvement)
  result.json    summary written when the run finishes
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = "sfc-run-v1"


# ---- checkpoints ---------------------------------------------------------------------------
def atomic_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then `os.replace`: a writer
    killed at any point leaves the previous file at `path` intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by `sfc` (a dict with `format == CHECKPOINT_FORMAT`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an sfc run checkpoint (expected a dict with "
                         f"format={CHECKPOINT_FORMAT!r}, as written by `python -m sfc.train`)")
    return ckpt


# ---- RNG state -----------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, as weights_only-loadable types."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---- code version and config ---------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe --always --dirty` of the source tree if it is a git checkout, else the
    package version."""
    import sfc

    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"sfc {sfc.__version__}"


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temp + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ---- logging -------------------------------------------------------------------------------
class RunLogger:
    """log.txt + metrics.jsonl + TensorBoard; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | os.PathLike | None, enabled: bool = True):
        self.enabled = enabled and run_dir is not None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._tb = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.run_dir / "log.txt", "a", buffering=1)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    @property
    def tb(self):
        if self.enabled and self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        return self._tb

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")

    def metrics(self, record: dict) -> None:
        if self.enabled:
            self._jsonl.write(json.dumps(record) + "\n")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def image(self, tag: str, img_hwc: np.ndarray, step: int) -> None:
        if self.enabled:
            self.tb.add_image(tag, img_hwc, step, dataformats="HWC")

    def flush(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            if self._tb is not None:
                self._tb.close()
            self._log.close()
            self._jsonl.close()
