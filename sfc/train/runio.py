"""Run-directory I/O: atomic checkpoints, config with code version, logs, RNG state.

Layout of a run directory (rank 0 writes everything):
  .lock          pid and host of the process running it (one run directory, one process)
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
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = "sfc-run-v1"
# Config keys that change a run's trajectory: a resume must not change them (world_size is
# recorded beside the config). `iters` sets the poly LR of the segnet stage only.
TRAJECTORY_KEYS = ("stage", "source", "num_classes", "source_size", "target_size", "layers",
                   "width", "seed", "batch_size", "world_size", "optimizer", "lr",
                   "weight_decay", "momentum", "warmup_lr", "warmup_iters", "warmup_order",
                   "sfc_weight", "scale", "source_prev_forward", "amp", "source_list",
                   "synthia_val_frames", "bn_control")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (in use, another configuration, an
    unreadable last.pt); the message names the directory or file."""


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


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint written by `sfc` (a dict with `format == CHECKPOINT_FORMAT`); an
    unreadable or truncated file is a RunDirError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, not a pickle, ...: name the file
        raise RunDirError(f"{path}: cannot be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no detail'}) — truncated or "
                          "not a checkpoint; move it away to start this run afresh") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path} is not an sfc run checkpoint (expected a dict with "
                          f"format={CHECKPOINT_FORMAT!r}, as written by `python -m sfc.train`)")
    return ckpt


# ---- one run directory, one process ----------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`.lock` in the run directory, created exclusively (O_EXCL) with the holder's pid and
    host. A second process on the same directory gets a RunDirError naming the holder; a lock
    whose process is gone (same host, pid not running) is taken over (`taken_over` says
    whose). A lock from another host cannot be checked and is respected."""

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / self.NAME
        self.taken_over: dict | None = None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and (holder.get("host") != me["host"]
                                           or _pid_alive(int(holder.get("pid", -1)))):
                    raise RunDirError(
                        f"{self.path.parent} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')} (since {holder.get('since')}; lock "
                        f"{self.path}); wait for it to finish or use another --out (if that "
                        "process is gone on another machine, delete the lock file)") from None
                self.taken_over = holder or {"pid": None, "host": None}
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.mine = me
            return
        raise RunDirError(f"{self.path}: could not take the lock (another process keeps "
                          "creating it)")

    def _holder(self) -> dict | None:
        """The lock's content; None when unreadable (a writer killed mid-write) even after a
        short wait for a writer that has just created it."""
        for wait in (0.0, 0.2):
            time.sleep(wait)
            try:
                return json.loads(self.path.read_text())
            except (OSError, ValueError):
                continue
        return None

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()) == self.mine:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def remove_stale_temps(run_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """Delete the temporary files of atomic writes (`.<name>.tmp.<pid>`) that killed writers
    left behind; call with the run's lock held. Returns (name, bytes) of each."""
    removed = []
    for p in Path(run_dir).glob(".*.tmp.*"):
        if p.is_file():
            removed.append((p.name, p.stat().st_size))
            p.unlink(missing_ok=True)
    return removed


# ---- resuming -------------------------------------------------------------------------------
def trajectory_config(config: dict, world_size) -> dict:
    """The trajectory-defining part of a config (see TRAJECTORY_KEYS)."""
    out = {k: config.get(k) for k in TRAJECTORY_KEYS if k in config or k == "world_size"}
    out["world_size"] = world_size
    if config.get("stage") == "segnet":
        out["iters"] = config.get("iters")
    return out


def config_differences(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for each trajectory key recorded in both that differs (JSON
    normalises tuples to lists)."""
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731
    return [f"{k} {norm(saved[k])!r} -> {norm(now[k])!r}" for k in now
            if k in saved and saved[k] is not None and norm(saved[k]) != norm(now[k])]


def check_resume(run_dir: str | os.PathLike, config: dict, world_size: int) -> dict | None:
    """Before training starts: the run directory's `last.pt` (returned, or None when there is
    none) must be readable and of the same stage, and the recorded configuration (`last.pt`'s,
    else `config.json`'s) must agree with `config` in every trajectory key. RunDirError
    otherwise, naming the differing keys."""
    run_dir = Path(run_dir)
    last, cfg_file = run_dir / "last.pt", run_dir / "config.json"
    ckpt = None
    if last.is_file():
        ckpt = load_checkpoint(last)
        if ckpt.get("stage") != config["stage"]:
            raise RunDirError(f"{last} belongs to a {ckpt.get('stage')!r} run, not "
                              f"{config['stage']!r}; use another --out")
        saved = trajectory_config(ckpt.get("config") or {}, ckpt.get("world_size"))
    elif cfg_file.is_file():
        try:
            rec = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise RunDirError(f"{cfg_file}: not JSON ({e})") from None
        saved = trajectory_config(rec.get("config") or {}, rec.get("world_size"))
    else:
        return None
    diff = config_differences(saved, trajectory_config(config, world_size))
    if diff:
        raise RunDirError(f"{run_dir} holds a run with another configuration ("
                          + "; ".join(diff) + "): resuming would change its trajectory; use "
                          "another --out, or the run's own flags")
    return ckpt


def set_aside_orphaned_best(run_dir: str | os.PathLike, ckpt: dict | None) -> list[str]:
    """`best.pt` must hold the best recorded in `last.pt` (`ckpt`; None for a fresh start).
    One from an abandoned trajectory (written at an evaluation whose `last.pt` a crash
    prevented) is renamed `best.pt.orphaned`. When the recorded best is `last.pt`'s own
    iteration, `best.pt` is written again from `last.pt`'s networks; an older recorded best was
    overwritten by the orphan and is lost: the best is then tracked afresh (`ckpt["best"]` is
    reset). Returns warnings for the log."""
    run_dir = Path(run_dir)
    path = run_dir / "best.pt"
    best = ckpt["best"] if ckpt else {"iter": None, "value": None}
    if not path.is_file():
        return []
    try:
        it = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("iter")
    except Exception:  # unreadable: certainly not the recorded best
        it = "unreadable"
    if it == best.get("iter"):
        return []
    dest = path.with_name("best.pt.orphaned")
    os.replace(path, dest)
    notes = [f"warning: {path} (iteration {it}) is not the best recorded in last.pt "
             f"(iteration {best.get('iter')}): set aside as {dest.name}"]
    if ckpt is None or best.get("iter") is None:
        return notes
    if best["iter"] == ckpt["iter"]:
        atomic_save({k: ckpt[k] for k in ("format", "stage", "iter", "models", "config",
                                          "world_size", "version") if k in ckpt}
                    | {"metric": ckpt.get("last_eval")}, path)
        notes.append(f"best.pt of iteration {best['iter']} written again from last.pt")
    else:
        notes.append(f"warning: the best.pt of iteration {best['iter']} was overwritten by the "
                     "abandoned trajectory and cannot be recovered; the best is tracked afresh "
                     f"from iteration {ckpt['iter']} on")
        ckpt["best"] = {"iter": None, "value": None}
    return notes


def truncate_metrics(path: str | os.PathLike, last_iter: int) -> int:
    """Keep the records of `metrics.jsonl` up to iteration `last_iter` (a resumed run logs the
    replayed iterations again); drops unparsable (half-written) lines. Returns lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict) and rec.get("iter", 0) > last_iter:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
    return dropped


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

    def __init__(self, run_dir: str | os.PathLike | None, enabled: bool = True,
                 purge_step: int | None = None):
        """`purge_step`: on resume, TensorBoard drops the events at this step and later (the
        replayed iterations) from what it shows."""
        self.enabled = enabled and run_dir is not None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.purge_step = purge_step
        self._tb = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.run_dir / "log.txt", "a", buffering=1)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    @property
    def tb(self):
        if self.enabled and self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.purge_step)
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
