"""Run-directory I/O: atomic checkpoints, config with code version, logs, RNG state.

Layout of a run directory (rank 0 writes everything):
  .lock          pid, host and job id of the process running it (one directory, one process)
  config.json    resolved configuration + code version
  log.txt        human-readable log (also printed)
  metrics.jsonl  one JSON object per logged event (train losses, evaluations)
  tb/            TensorBoard events (scalars, images at each evaluation)
  last.pt        everything to resume (written atomically at each evaluation and on a signal)
  best.pt        networks at the best monitored value (strict improvement)
  result.json    summary written when the run finishes
  status.json    why the last attempt stopped: reason, iteration, exit status, rank
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
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
                   "synthia_val_frames", "bn_control", "sfc_precision")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (in use, another configuration, an
    unreadable last.pt); the message names the directory or file."""


# ---- checkpoints ---------------------------------------------------------------------------
class WriteError(OSError):
    """A file of the run directory could not be written (full disk, quota, permissions); the
    message names the file, the reason and the free space. The previous file is intact."""


def free_space(folder: str | os.PathLike) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free"
    except OSError:
        return "free space unknown"


def _write_error(path: Path, reason: str) -> WriteError:
    return WriteError(None, f"writing {path} failed ({reason}; {free_space(path.parent)} in "
                            f"{path.parent})")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then `os.replace`: a writer
    killed at any point leaves the previous file at `path` intact. A failed write (a full
    disk) removes the temporary file and raises WriteError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e.strerror or str(e)) from None
    except RuntimeError as e:  # torch.save's zip writer reports a full disk this way
        raise _write_error(path, str(e).splitlines()[0]) from None
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
                          "not a checkpoint") from None
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


def job_id() -> str | None:
    """The scheduler's id of this job (SLURM_JOB_ID, else TORCHELASTIC_RUN_ID), or None. A
    SLURM requeue keeps the job id, on whatever node the job lands."""
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        v = os.environ.get(var)
        if v and v != "none":
            return f"{var}={v}"
    return None


class RunLock:
    """`.lock` in the run directory, created exclusively (O_EXCL) with the holder's pid, host
    and scheduler job id, refreshed (`refresh`) at every checkpoint. A second process on the
    same directory gets a RunDirError naming the holder. Taken over: a lock whose process is
    gone (same host, pid not running); a lock of the same job id on another host (a requeued
    job on another node); any lock with `force=True` (`--force-unlock`: the user says its job
    is gone). `taken_over` says whose."""

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike, force: bool = False):
        self.path = Path(run_dir) / self.NAME
        self.taken_over: dict | None = None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "job": job_id(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not force and not self._stale(holder, me):
                    when = holder.get("refreshed") or holder.get("since")
                    job = f", job {holder['job']}" if holder.get("job") else ""
                    raise RunDirError(
                        f"{self.path.parent} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')}{job} (since {holder.get('since')}, last "
                        f"checkpoint {when}; lock {self.path}); wait for it to finish or use "
                        "another --out; if that job is gone (a node failure, a hard kill), "
                        "run again with --force-unlock") from None
                self.taken_over = holder or {"pid": None, "host": None}
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.mine = me
            return
        raise RunDirError(f"{self.path}: could not take the lock (another process keeps "
                          "creating it)")

    @staticmethod
    def _stale(holder: dict, me: dict) -> bool:
        if holder.get("host") == me["host"]:
            return not _pid_alive(int(holder.get("pid", -1)))
        return holder.get("job") is not None and holder.get("job") == me["job"]

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

    def refresh(self) -> None:
        """Record the time of the latest checkpoint in the lock (never raises)."""
        try:
            if json.loads(self.path.read_text()) != self.mine:
                return
            self.mine = dict(self.mine, refreshed=time.strftime("%Y-%m-%d %H:%M:%S"))
            write_json(self.path, self.mine)
        except (OSError, ValueError):
            pass

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


def _read_config_json(path: Path) -> dict | None:
    """config.json's record, None when absent; RunDirError when it does not parse."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        return rec
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e})") from None


def finished_result(run_dir: str | os.PathLike, iters: int) -> dict | None:
    """`result.json` of a run that has finished `iters` iterations (its last evaluated
    iteration), else None. A finished run needs neither `last.pt` nor anything else to say so."""
    path = Path(run_dir) / "result.json"
    try:
        rec = json.loads(path.read_text())
        done = int(rec["last"]["iter"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if done >= int(iters) else None


def check_resume(run_dir: str | os.PathLike, config: dict, world_size: int,
                 notes: list | None = None) -> dict | None:
    """Before training starts: the run directory's `last.pt` (returned, or None when there is
    none) must be readable and of the same stage, and the recorded configuration (`last.pt`'s,
    else `config.json`'s) must agree with `config` in every trajectory key. RunDirError
    otherwise, naming the differing keys. A `config.json` that does not parse beside a readable
    `last.pt` is rewritten from the checkpoint's configuration (a line in `notes`)."""
    run_dir = Path(run_dir)
    last, cfg_file = run_dir / "last.pt", run_dir / "config.json"
    ckpt = None
    if last.is_file():
        ckpt = load_checkpoint(last)
        if ckpt.get("stage") != config["stage"]:
            raise RunDirError(f"{last} belongs to a {ckpt.get('stage')!r} run, not "
                              f"{config['stage']!r}; use another --out")
        saved = trajectory_config(ckpt.get("config") or {}, ckpt.get("world_size"))
        try:
            _read_config_json(cfg_file)
        except RunDirError as e:
            if notes is not None:  # the caller (rank 0) rewrites it
                write_json(cfg_file, {"config": ckpt.get("config"),
                                      "version": ckpt.get("version"),
                                      "world_size": ckpt.get("world_size")})
                notes.append(f"warning: {e}; rewritten from {last} (iteration {ckpt['iter']})")
    elif cfg_file.is_file():
        rec = _read_config_json(cfg_file)
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


def rng_state(device: torch.device | None = None) -> dict:
    """Python, NumPy and torch generator states, and that of this process's own CUDA device
    (`device`, when CUDA; no other device is touched), as weights_only-loadable types."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if device is None or torch.device(device).type != "cuda":
        return
    device = torch.device(device)
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state:  # older checkpoints: every visible device's state
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][index], device)


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
    """Write JSON atomically (temp + rename); WriteError (the previous file intact) when it
    cannot be written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e.strerror or str(e)) from None
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)


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
        self._write(self._log, line + "\n")

    def _write(self, f, text: str) -> None:
        """A log line that cannot be written (a full disk) is still printed; the run's own
        checks decide whether to stop, not a logging call."""
        try:
            f.write(text)
        except OSError:
            pass

    def metrics(self, record: dict) -> None:
        if self.enabled:
            self._write(self._jsonl, json.dumps(record) + "\n")

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
            for f in (self._log, self._jsonl):
                try:
                    f.close()
                except OSError:
                    pass


# ---- why the run stopped -------------------------------------------------------------------
EXIT_STATUS = {"finished": 0, "stop_after": 0, "bad_input": 2, "data_error": 2,
               "resume_mismatch": 2, "nonfinite": 3, "write_failed": 4, "peer_failed": 5}


def status_record(reason: str, exit_status: int, iteration: int | None = None,
                  rank: int | None = None, message: str = "", resumable: bool = False,
                  **extra) -> dict:
    """What `status.json` (and `$SFC_STATUS_FILE`) hold: why the attempt stopped, at which
    iteration, the exit status the documentation gives for it, the rank the reason came from,
    whether running the same command again resumes, and `$SFC_ATTEMPT_ID` when set."""
    rec = {"reason": reason, "exit_status": int(exit_status), "iteration": iteration,
           "rank": rank, "resumable": bool(resumable), "message": message,
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(),
           "attempt": os.environ.get("SFC_ATTEMPT_ID")}
    rec.update(extra)
    return rec


def write_status(path: str | os.PathLike, record: dict) -> bool:
    """Write a status record; False (never an exception) when it cannot be written."""
    try:
        write_json(path, record)
        return True
    except OSError:
        return False
