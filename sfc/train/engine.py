"""The one training loop of every stage: data streams, LR, step, evaluation, checkpoints,
logging, resume, signals, multi-process.

Per iteration i (0-based): set the stage's LR for i → source (+ target) losses, each
back-propagated separately (`stage.train_step`) → [several processes: average the trainable
gradients] → one optimiser step → the parameters must be finite. After iteration
i+1 ≡ 0 (mod eval_every), and always after the last iteration: evaluate, write `best.pt` on a
strict improvement, write `last.pt`.

Before the first iteration the run directory is checked (`runio`): a lock (one process per
directory), stale temporary files removed, `last.pt` readable and of the same trajectory
(stage, sizes, seed, world size, optimiser, ...), a `best.pt` from an abandoned trajectory set
aside, `metrics.jsonl` and TensorBoard cut back to the resumed iteration.

Stops: SIGINT, SIGTERM or SIGUSR1 (to the process or its whole group: loader workers ignore
them) save `last.pt` and exit 128 + signal; a non-finite loss, flow or parameter exits 3 with
`last.pt` untouched (checked every iteration; read at once or every N iterations, with the bad
update discarded on the device: `--check-every`, `sfc.train.guard`); a data error (also inside
a loader worker) saves `last.pt`, is logged and exits 2 with the one-line `DatasetError`; a
checkpoint that cannot be written (a full disk) exits 4 with the previous `last.pt` /
`best.pt` intact; a dead peer process exits 5 (rank 0 saves the state of the last iteration
boundary). Every stop writes `status.json` (reason, iteration, exit status, rank it came
from, resumable).

Several processes (torchrun): every stop is agreed before anyone acts — each rank's reasons
(signal, data error, failed write, --stop-after) are gathered once per iteration, after the
next batch is read and before the next step; divergence checks reduce before the backward
(deferred ones at each read); evaluation loops agree on data errors before their final
all-reduce. So all ranks stop at the same iteration with the same exit status, rank 0 saving
and logging why and on which rank. After a resume every rank must hold the same iteration and
data position (else exit 2). Each draws its own shard of every epoch; the trained networks are
wrapped in `DistributedDataParallel` after the resume (rank 0's parameters and buffers are broadcast
once; no buffer sync in the forward), the source backward runs under `no_sync()`
when the SFC loss follows (its two forwards, then one backward, reduce the summed gradient
once), frozen networks take no part. BatchNorm running statistics are per rank during training;
rank 0's are broadcast before each evaluation (what is evaluated and saved, as a single GPU's
run would keep the statistics of the batches it saw). Rank 0 does all I/O.
"""

from __future__ import annotations

import gc
import json
import math
import re
import signal
import sys
import time
import zlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from sfc import dist, flags
from sfc.data.io import DatasetError
from sfc.models.dilated import set_dilated_impl
from sfc.train import graphed, runio, tb_pictures
from sfc.train.guard import NonFiniteLoss
from sfc.train.progress import make_progress
from sfc.train.stages import build_stage, stacks_forwards
from sfc.train.streams import (
    JOB_SIGNALS,
    SignalSafeLoader,
    TrainStream,
    plain_dataset_error,
    to_device,
    worker_init,
)
from sfc.train.valcache import CachedLoader

# A second signal this soon after the first is the same stop delivered twice — the job step
# signals every process and a launcher (torchrun) forwards the same signal to its workers —
# not a request to give up at once.
DUPLICATE_SIGNAL_S = 2.0
_clock = time.monotonic


class _Signals:
    """SIGINT/SIGTERM/SIGUSR1 set a flag; the loop saves last.pt after the current iteration.
    A second signal more than DUPLICATE_SIGNAL_S after the first gives up at once."""

    def __init__(self):
        self.signum = 0
        self._first_at = 0.0
        self._old = {}

    def __enter__(self):
        for s in JOB_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum:
            if _clock() - self._first_at < DUPLICATE_SIGNAL_S:
                return  # the same stop, delivered twice
            raise KeyboardInterrupt  # a second signal: give up at once
        self.signum, self._first_at = signum, _clock()

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


LAST_STATUS: dict | None = None  # the status record of this process's latest stop (rank 0)


class _Stop(Exception):
    """A stop every rank agreed on: `reason` (a key of runio.EXIT_STATUS, or "signal"), the
    rank it came from, a message; `save`: write last.pt first."""

    def __init__(self, reason: str, rank: int = 0, message: str = "", signum: int = 0,
                 save: bool = True, where: str = ""):
        super().__init__(reason)
        self.reason, self.rank, self.message, self.signum = reason, rank, message, signum
        self.save, self.where = save, where

    @property
    def exit_status(self) -> int:
        return 128 + self.signum if self.reason == "signal" else runio.EXIT_STATUS[self.reason]


def precision_line(cfg, device) -> str:
    """What arithmetic the run uses: autocast dtype, TF32 for convolutions and matmuls, and
    the dilated convolutions' form if not the native one, stacked target forwards if on."""
    amp = getattr(cfg, "amp", None) or "float32"
    if amp == "bf16" and getattr(cfg, "sfc_weight", 0) > 0:
        amp += (" (SFC term float32)" if getattr(cfg, "sfc_precision", "float32") == "float32"
                else " (SFC term bf16 too)")
    tf = (f"TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, TF32 "
          f"matmuls {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    cuda = torch.device(device).type == "cuda"
    where = "" if cuda else " (TF32 applies to CUDA only)"
    if cuda and torch.backends.cudnn.allow_tf32 and getattr(cfg, "sfc_weight", 0) > 0:
        where += (" — the SFC gradient with TF32 convolutions: cosine ≈ 0.98 to float64 "
                  "(docs/pipeline.md#precision; --tf32 off for float32)")
    s2b = ("; dilated convolutions on the space-to-batch view (--dilated-impl s2b)"
           if getattr(cfg, "dilated_impl", "native") == "s2b" else "")
    stack = ("; the SFC term's two target forwards stacked in one batch (--stack-forwards)"
             if stacks_forwards(cfg) else "")
    return f"autocast {amp}; {tf}{where}{s2b}{stack}"


def _per_class(result: dict, class_names) -> dict[str, float] | None:
    if "per_class" not in result:
        return None
    return {n: float(v) for n, v in zip(class_names, result["per_class"])}


class Trainer:
    def __init__(self, cfg, data):
        """`cfg`: resolved config namespace (sfc.train); `data`: object with `source`, `target`
        (or None), `val` datasets and `protocol` (and optionally `notes` for the log)."""
        self.cfg = cfg
        self.info = dist.init_distributed(cfg.device)
        self.main = self.info.rank == 0
        self.device = self.info.device
        self.run_dir = Path(cfg.out)
        self.lock = None
        self.log = None
        try:
            notes = self._prepare_run_dir()
            self.log = runio.RunLogger(self.run_dir, enabled=self.main,
                                       purge_step=self._purge_step)
            for note in notes:
                self.log.info(note)
            self.data = data
            runio.seed_everything(cfg.seed)
            self.stage = build_stage(cfg, self.device, log=self.log.info)
            self.stage.compile(getattr(cfg, "compile", "none"))
            self.graphed = None  # --cuda-graph: the iteration as one CUDA graph
            if getattr(cfg, "cuda_graph", False):
                why = graphed.unsupported(cfg, self.device, self.info.world_size)
                if why is not None:
                    raise flags.FlagError(why)
                self.graphed = graphed.GraphedStep(self.stage)
            self._build_loaders(data)
        except BaseException:
            self.close()
            raise
        self.vis_batch = None
        self.iter = 0
        self.best = {"iter": None, "value": None}
        self.last_eval = None
        self.held = {"last.pt": None, "best.pt": None}  # the iteration each file holds
        self.write_failure: str | None = None
        self._rng = None  # multi-process: the RNG state at the last iteration boundary
        self._states = None  # the data streams' positions at the last iteration boundary
        self._buffers = None  # multi-process: the networks' buffers at that boundary
        self.progress = getattr(cfg, "progress", "auto") or "auto"
        if self.progress == "auto":
            self.progress = "bar" if sys.stderr.isatty() else "lines"

    def _prepare_run_dir(self) -> list[str]:
        """Lock, clean, check the resume (see the module docstring); returns lines for the
        log. Rank 0 changes files; every rank reads `last.pt`."""
        notes, err = [], None
        self.finished = None
        try:
            if self.main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.lock = runio.RunLock(self.run_dir,
                                          force=bool(getattr(self.cfg, "force_unlock", False)))
                if self.lock.taken_over:
                    h = self.lock.taken_over
                    why = ("--force-unlock" if getattr(self.cfg, "force_unlock", False)
                           else "which is no longer running" if h.get("host") ==
                           self.lock.mine["host"] else f"of this job ({h.get('job')})")
                    notes.append(f"warning: took over the lock of pid {h.get('pid')} on "
                                 f"{h.get('host')}, {why}")
                for name, size in runio.remove_stale_temps(self.run_dir):
                    notes.append(f"removed {name} ({size / 2**20:.1f} MiB), a temporary file "
                                 "left by a killed writer")
            # a finished run says so from result.json alone (last.pt may be gone or damaged)
            self.finished = runio.finished_result(self.run_dir, self.cfg.iters)
            self._resume_ckpt = None if self.finished else runio.check_resume(
                self.run_dir, vars(self.cfg), self.info.world_size,
                notes if self.main else None)
        except (runio.RunDirError, OSError) as e:
            err = e
        dist.raise_if_any(err, cls=runio.RunDirError)  # every rank stops, rank 0 says why
        start = self._resume_ckpt["iter"] if self._resume_ckpt else 0
        self._purge_step = start + 1 if (self.run_dir / "tb").is_dir() else None
        if self.main and not self.finished:
            notes += runio.set_aside_orphaned_best(self.run_dir, self._resume_ckpt)
            dropped = runio.truncate_metrics(self.run_dir / "metrics.jsonl", start)
            if dropped:
                notes.append(f"metrics.jsonl cut back to iteration {start} ({dropped} records "
                             "of the interrupted trajectory dropped)")
        return notes

    def _build_loaders(self, data) -> None:
        cfg = self.cfg
        w, r = self.info.world_size, self.info.rank
        pin = self.device.type == "cuda"
        # independent, seeded orders for source and target (same permutation on every rank)
        self.streams = {"source": TrainStream(data.source, cfg.batch_size, cfg.seed, 0, r, w,
                                              cfg.num_workers, pin)}
        if data.target is not None:
            self.streams["target"] = TrainStream(data.target, cfg.batch_size, cfg.seed, 1, r, w,
                                                 cfg.num_workers, pin)
        self.log.info(f"data loaders: {cfg.num_workers} workers per loader"
                      + (f" ({len(self.streams)} training loader"
                         f"{'s' if len(self.streams) != 1 else ''})" if cfg.num_workers else ""))
        val = data.val
        if cfg.val_limit is not None:
            val = Subset(val, range(min(cfg.val_limit, len(val))))
        # on the device; after the first complete evaluation from memory (--val-cache-gb)
        self.val_loader = CachedLoader(SignalSafeLoader(DataLoader(
            val, batch_size=getattr(cfg, "val_batch_size", 1), sampler=dist.ShardSampler(val),
            num_workers=cfg.num_workers,
            pin_memory=pin, worker_init_fn=worker_init())), self.device,
            getattr(cfg, "val_cache_gb", 0.0), log=self.log.info)

    def close(self) -> None:
        for stream in getattr(self, "streams", {}).values():
            stream.close()  # the loader workers now, not at interpreter exit
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- checkpoints ------------------------------------------------------------------
    def _ckpt(self, full: bool, metric: dict | None = None) -> dict:
        ck = {"format": runio.CHECKPOINT_FORMAT, "stage": self.cfg.stage, "iter": self.iter,
              "models": self.stage.saved_state(), "config": vars(self.cfg),
              "world_size": self.info.world_size, "version": runio.code_version(),
              "metric": metric}
        if full:
            ck.update(optimizer=self.stage.optimizer.state_dict(), best=dict(self.best),
                      last_eval=self.last_eval, rng=self._rng or runio.rng_state(self.device),
                      streams={k: s.state_dict() for k, s in self.streams.items()})
        return ck

    def save_last(self) -> bool:
        """Rank 0 writes last.pt (no collective); a failed write is remembered (the run stops
        at the next agreement, the previous last.pt intact). Returns whether it was written."""
        if not self.main or self.write_failure is not None:
            return False
        try:
            runio.atomic_save(self._ckpt(full=True, metric=self.last_eval),
                              self.run_dir / "last.pt")
        except runio.WriteError as e:
            self.write_failure = str(e)
            return False
        self.held["last.pt"] = self.iter
        self.lock.refresh()
        return True

    def _write_status(self, stop: _Stop | None, iteration: int) -> None:
        """status.json in the run directory (rank 0), and LAST_STATUS for $SFC_STATUS_FILE."""
        global LAST_STATUS
        if not self.main:
            return
        if stop is None:
            rec = runio.status_record("finished", 0, iteration, 0, "finished")
        else:
            resumable = stop.reason not in ("nonfinite", "finished")
            rec = runio.status_record(
                stop.reason, stop.exit_status, iteration, stop.rank, stop.message,
                resumable=resumable, signal=signal.Signals(stop.signum).name if stop.signum
                else None, last_pt_iteration=self.held.get("last.pt"),
                best_pt_iteration=self.held.get("best.pt"))
        LAST_STATUS = rec
        runio.write_status(self.run_dir / "status.json", rec)

    def resume(self) -> bool:
        """Continue from `last.pt` (already checked by `runio.check_resume`)."""
        ck, path = self._resume_ckpt, self.run_dir / "last.pt"
        if ck is None:
            return False
        self.stage.load_saved_state(ck["models"])
        self.stage.optimizer.load_state_dict(ck["optimizer"])
        for k, s in self.streams.items():
            s.load_state_dict(ck["streams"][k])
        runio.set_rng_state(ck["rng"], self.device)
        self.iter, self.best, self.last_eval = ck["iter"], ck["best"], ck["last_eval"]
        self.held = {"last.pt": ck["iter"], "best.pt": ck["best"].get("iter")}
        quiet = ("num_workers", "device", "force_unlock", "progress", "progress_every",
                 "threads", "precision")
        changed = {k: (ck["config"].get(k), v) for k, v in vars(self.cfg).items()
                   if ck["config"].get(k) != v and k not in quiet}
        self.log.info(f"resumed from {path} at iteration {self.iter}"
                      + (f"; config changes (old, new): {changed}" if changed else ""))
        self._resume_ckpt = None  # free the memory
        return True

    def _check_ranks_agree(self) -> None:
        """After a resume: every rank must hold the same iteration and data position (a
        lagging shared file system can show rank 0 a newer last.pt than the others)."""
        pos = json.dumps({k: s.state_dict() for k, s in self.streams.items()}, sort_keys=True,
                         default=str)
        rows = dist.gather_rows([self.iter, zlib.crc32(pos.encode())])
        if any(r != rows[0] for r in rows):
            what = ", ".join(f"rank {r} at iteration {it}" for r, (it, _) in enumerate(rows))
            raise _Stop("resume_mismatch", save=False, message=(
                f"the processes resumed different states ({what}; the same iteration with "
                "another data position where the iterations agree): they read different "
                f"files in {self.run_dir} — a shared file system that has not caught up? Run "
                "the same command again once every node sees the same last.pt"))

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self) -> dict:
        self.stage.broadcast_buffers()
        res = self.stage.validate(self.val_loader,
                                  progress=self.main and self.progress == "bar")
        mon = self.stage.monitor
        value = float(res[mon])
        names = self.data.protocol.class_names if self.data.protocol else []
        extra = {k: float(res[k]) for k in self.stage.extra_metrics if k in res}
        rec = {"iter": self.iter, "value": value, "monitor": mon,
               "per_class": _per_class(res, names), "extra": extra}
        self.last_eval = rec
        better = (self.best["value"] is None
                  or (value > self.best["value"] if self.stage.higher_is_better
                      else value < self.best["value"]))
        if better and self.main:  # best.pt first: the best counts once it is on disk
            try:
                runio.atomic_save(self._ckpt(full=False, metric=rec), self.run_dir / "best.pt")
                self.held["best.pt"] = self.iter
            except runio.WriteError as e:
                self.write_failure, better = str(e), False
        if better:
            self.best = {"iter": self.iter, "value": value, "extra": extra}
        if self.main:
            self.log.metrics({"split": "val", "iter": self.iter, mon: value, **extra,
                              "per_class": rec["per_class"], "best": better})
            scalars = {f"val/{mon}": value, **{f"val/{k}": v for k, v in extra.items()}}
            for n, v in (rec["per_class"] or {}).items():
                scalars[f"val_iou/{n}"] = v
            self.log.scalars(scalars, self.iter)
            more = "".join(f", {k} {v:.4f}" for k, v in extra.items())
            if better:
                note = " (best)"
            elif self.write_failure is not None:
                note = " (best.pt could not be written: it keeps the previous best)"
            else:
                note = f" (best {self.best['value']:.4f} at {self.best['iter']})"
            self.log.info(f"iter {self.iter}: val {mon} {value:.4f}{more}{note}")
            self._pictures()
            self.log.flush()
        return rec

    def _evaluate_or_stop(self) -> dict:
        try:
            return self.evaluate()
        except DatasetError as e:  # every rank raises it (sfc.dist.agreed)
            raise _Stop("data_error", message=flags.one_line(plain_dataset_error(e)),
                        where=f"in the evaluation at iteration {self.iter}") from None

    def _saved_iter(self) -> str:
        p = self.run_dir / "last.pt"
        if not p.is_file():
            return "none saved yet"
        return f"at iteration {runio.load_checkpoint(p, mmap=True)['iter']}"

    def _pictures(self) -> None:
        try:
            if self.vis_batch is None:
                self.vis_batch = next(iter(DataLoader(self.val_loader.dataset, batch_size=1)))
            batch = to_device(self.vis_batch, self.device)
            palette = self.data.protocol.palette if self.data.protocol else None
            for tag, img in tb_pictures.draw(self.stage, batch, palette).items():
                self.log.image(tag, img, self.iter)
        except Exception as e:  # pictures must never stop a run
            self.log.info(f"warning: could not draw evaluation pictures: {e!r}")

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        """Train to `iters` (or a stop); returns the exit status (a data error is raised as
        its one-line DatasetError after last.pt is saved, on every rank)."""
        # the job signals stay caught while a stop is carried out: a launcher's SIGTERM (torchrun
        # ends the other workers when one exits non-zero) must not kill rank 0 while it saves
        with _Signals() as self.sig:
            try:
                return self._run()
            except _Stop as st:
                return self._stop(st)
            except Exception as e:
                if not dist.is_peer_failure(e):
                    raise
                self.peer_failed = True
                return self._peer_failed(e)

    def _fetch(self):
        """The next source (+ target) batch, the streams' positions before it, and the
        DatasetError that reading it raised (the streams then put back)."""
        self._states = {k: s.state_dict() for k, s in self.streams.items()}
        try:
            src = to_device(next(self.streams["source"]), self.device)
            tgt = (to_device(next(self.streams["target"]), self.device)
                   if "target" in self.streams else None)
            return (src, tgt), None
        except DatasetError as e:
            self._restore_streams()
            return None, e

    def _restore_streams(self) -> None:
        for k, st in (self._states or {}).items():
            self.streams[k].load_state_dict(st)

    def _agree(self, signum: int, fetch_error, stepped: bool = True) -> None:
        """Once per iteration, every rank's reasons to stop are gathered (one all-reduce of a
        few ints; nothing in a single process): a failed write (rank 0), a data error, a
        signal, --stop-after. Raises _Stop on every rank alike, or returns."""
        cfg = self.cfg
        running = self.iter < cfg.iters  # at the end the run finishes instead
        row = [int(self.write_failure is not None), int(fetch_error is not None),
               signum if running else 0,
               int(stepped and running and self.iter == cfg.stop_after)]
        rows = dist.gather_rows(row)
        firsts = [next((r for r, x in enumerate(rows) if x[col]), None) for col in range(4)]
        if firsts[0] is not None:
            raise _Stop("write_failed", firsts[0], self.write_failure or "", save=False)
        if firsts[1] is not None:
            msgs = dist.gather_objects(
                None if fetch_error is None else flags.one_line(plain_dataset_error(fetch_error)))
            raise _Stop("data_error", firsts[1], msgs[firsts[1]],
                        where=f"at iteration {self.iter + 1}")
        if firsts[2] is not None:
            raise _Stop("signal", firsts[2], signum=rows[firsts[2]][2])
        if firsts[3] is not None:
            raise _Stop("stop_after", firsts[3])

    def _read_guard(self, collective: bool = True) -> None:
        """Deferred finiteness checks (sfc.train.guard): read the device flags (one sync; with
        `collective`, every rank at the same point) and stop on the first bad iteration."""
        found = self.stage.guard.read(collective)
        if found is None:
            return
        it, what, term, rank = found
        on = f" on rank {rank}" if self.info.world_size > 1 else ""
        raise _Stop("nonfinite", rank, save=False, message=(
            f"non-finite {what} at iteration {it}{on} (term {term!r}), found by the check "
            f"after iteration {self.iter} (--check-every {self.stage.guard.every}); the "
            f"updates of iterations {it}-{self.iter} were discarded"))

    def _snapshot(self) -> None:
        """Several processes: remember this boundary's RNG state and buffers, so that a peer's
        death in the middle of the next step still leaves rank 0 a consistent state to save."""
        if self.info.world_size <= 1:
            return
        self._rng = runio.rng_state(self.device)
        bufs = [b for net in self.stage.nets.values() for b in net.buffers()]
        if self._buffers is None:
            self._buffers = ([b.detach().clone() for b in bufs], bufs)
        else:
            torch._foreach_copy_(self._buffers[0], bufs)

    def _at_boundary(self) -> None:
        """Undo a partial step (a peer died in it): buffers and RNG state back to the last
        boundary; the parameters and optimiser were not stepped."""
        if self._buffers is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._buffers[1], self._buffers[0])
        self.stage.optimizer.zero_grad(set_to_none=True)

    def _run(self) -> int:
        cfg, stage = self.cfg, self.stage
        result_path = self.run_dir / "result.json"
        if self.finished:
            self.log.info(f"run {self.run_dir} already finished ({self.finished['last']['iter']}"
                          f" iterations, {result_path}); nothing to do")
            self._write_status(None, self.finished["last"]["iter"])
            return 0
        resumed = self.resume()
        self._check_ranks_agree()
        if self.info.world_size > 1:
            stage.wrap_ddp()  # after the resume: rank 0's state is broadcast
        if resumed and self.iter >= cfg.iters and result_path.is_file():
            self.log.info(f"run {self.run_dir} already finished ({self.iter} iterations); "
                          "nothing to do")
            self._write_status(None, self.iter)
            return 0
        if self.main and not resumed:
            runio.write_json(self.run_dir / "config.json",
                             {"config": vars(cfg), "version": runio.code_version(),
                              "world_size": self.info.world_size})
            self.log.info(f"stage {cfg.stage} -> {self.run_dir} ({cfg.iters} iterations, "
                          f"{self.info.world_size} process(es), device {self.device})")
        self.log.info(f"precision: {precision_line(cfg, self.device)}")
        guard = stage.guard
        self.log.info("finiteness checks: " + (
            f"flags on the device, read every {guard.every} iterations and before every "
            "evaluation and save (a bad iteration's update is discarded)" if guard.deferred
            else "read at once (before each backward, after each step)"))
        if self.graphed is not None:
            self.log.info(f"--cuda-graph: the iteration is captured as one CUDA graph after "
                          f"{self.graphed.warmup} eager iterations, then replayed")
        for note in getattr(self.data, "notes", ()):
            self.log.info(note)
        self.bar = make_progress(self.progress, total=cfg.iters, initial=self.iter,
                                 desc=cfg.stage, enabled=self.main,
                                 every=getattr(cfg, "progress_every", 30.0))
        t0 = time.time()
        sig = self.sig
        if (self.iter and self.iter % cfg.eval_every == 0 and self.iter < cfg.iters
                and (self.last_eval or {}).get("iter") != self.iter):
            self._evaluate_or_stop()  # an evaluation a data error interrupted
        batch, err = self._fetch() if self.iter < cfg.iters else (None, None)
        self._agree(sig.signum, err, stepped=False)
        while self.iter < cfg.iters:
            i = self.iter
            self._snapshot()
            self._phase = "step"
            stage.train_mode()
            lr = stage.set_iteration_lr(i)
            try:
                if self.graphed is not None:  # deferred checks: nothing raised in the step
                    was = self.graphed.captured
                    terms = self.graphed(i, batch)
                    if not was and self.graphed.captured:
                        self.log.info(f"iteration {i + 1}: CUDA graph captured in "
                                      f"{self.graphed.capture_s:.1f} s; replayed from here")
                else:
                    stage.optimizer.zero_grad(set_to_none=True)
                    terms = stage.train_step(*batch)
            except NonFiniteLoss as e:
                self._read_guard()  # an earlier bad iteration (deferred checks) comes first
                on = f" on rank {e.rank}" if self.info.world_size > 1 else ""
                raise _Stop("nonfinite", e.rank, save=False, message=(
                    f"non-finite {e.what} at iteration {i + 1}{on} (term {e.term!r}"
                    + (f" = {e.value}" if e.rank == self.info.rank else "")
                    + "), before its backward")) from None
            # the step and its parameter check (read at once: the bad parameter's name)
            bad = stage.optimizer_step(i) if self.graphed is None else None
            if bad is not None:
                raise _Stop("nonfinite", 0, save=False, message=(
                    f"non-finite parameter {bad!r} after the step of iteration {i + 1} "
                    "(term 'parameters')"))
            self.iter = i + 1
            self._phase = "boundary"
            logging = self.iter % cfg.log_every == 0 or self.iter == 1
            boundary = self.iter % cfg.eval_every == 0 or self.iter == cfg.iters
            fresh = not guard.deferred
            if guard.deferred and (logging or boundary or self.iter % guard.every == 0):
                self._read_guard()  # deferred checks: read (one sync) before anything is kept
                terms, fresh = {k: float(v) for k, v in terms.items()}, True
            if fresh:
                self.bar.set_postfix({**{k: f"{v:.4g}" for k, v in terms.items()},
                                      "lr": f"{lr:.2e}"}, refresh=False)
            self.bar.update(1)
            if self.main and logging:
                self.log.metrics({"split": "train", "iter": self.iter, "lr": lr, **terms,
                                  "sec": round(time.time() - t0, 2)})
                self.log.scalars({**{f"train/loss_{k}": v for k, v in terms.items()},
                                  "train/lr": lr}, self.iter)
            if boundary:
                self._evaluate_or_stop()
                self.save_last()
            batch, err = self._fetch() if self.iter < cfg.iters else (None, None)
            self._agree(sig.signum, err)
        self.bar.close()
        if self.last_eval is None or self.last_eval["iter"] != self.iter:
            self._evaluate_or_stop()  # quirk 1: the final iterate is always evaluated and kept
            self.save_last()
        if self.main and self.write_failure is None:
            try:
                self._write_result(result_path)
            except runio.WriteError as e:
                self.write_failure = str(e)
        self._agree(0, None)  # a failed final write stops every rank alike
        self._write_status(None, self.iter)
        dist.barrier()
        return 0

    def _stop(self, st: _Stop) -> int:
        """Carry out a stop every rank agreed on: streams back to the boundary, last.pt saved
        when the reason allows, one log line (rank 0) naming the reason and its rank,
        status.json; a data error is raised again as its one-line DatasetError."""
        bar = getattr(self, "bar", None)
        if bar is not None:
            bar.close()
        self._restore_streams()
        if st.save:
            try:
                self._read_guard()  # nothing is saved past an unread bad iteration
            except _Stop as bad:
                st = bad
        saved = self.save_last() if st.save else False
        if st.save and self.main and not saved:  # the save itself failed: a write failure
            st = _Stop("write_failed", 0, self.write_failure or "", save=False)
        on = f" (from rank {st.rank})" if self.info.world_size > 1 else ""
        def holds(name):
            it = self.held[name]
            return f"{name} {'holds iteration ' + str(it) if it is not None else 'not written yet'}"

        kept = f"{holds('last.pt')}, {holds('best.pt')}"
        if st.reason == "data_error":
            msg = (f"stopping: data error {st.where}{on}: {st.message} — last.pt saved at "
                   f"iteration {self.iter}; fix the file (python -m sfc.data.check) and run "
                   "the same command again to resume")
        elif st.reason == "signal":
            msg = (f"stopped at iteration {self.iter} ({signal.Signals(st.signum).name}{on}); "
                   f"last.pt saved in {self.run_dir} — run the same command again to resume")
        elif st.reason == "stop_after":
            msg = (f"stopped at iteration {self.iter} (--stop-after {self.cfg.stop_after}); "
                   f"last.pt saved in {self.run_dir} — run the same command again to resume")
        elif st.reason == "nonfinite":
            msg = f"stopping: {st.message}; last.pt left untouched ({self._saved_iter()})"
        elif st.reason == "write_failed":
            msg = (f"stopping: {st.message}{on}; {kept} — free space and run the same command "
                   "again to resume")
        else:  # resume_mismatch
            msg = f"stopping: {st.message}"
        if self.main:
            self.log.info(msg)
            if st.reason in ("write_failed", "resume_mismatch", "nonfinite"):
                print(f"sfc.train: error: {msg[len('stopping: '):]}", file=sys.stderr)
        self._write_status(st, self.iter)
        try:  # nobody exits (and makes a launcher end the others) before rank 0 has saved
            dist.barrier()
        except Exception as e:
            if not dist.is_peer_failure(e):
                raise
            self.peer_failed = True
        if st.reason == "data_error":
            raise DatasetError(st.message + on)
        return st.exit_status

    def _peer_failed(self, e: BaseException) -> int:
        """Another process died (a collective failed): rank 0 saves the state of the last
        iteration boundary — no collective needed — and says so; every survivor exits 5."""
        bar = getattr(self, "bar", None)
        if bar is not None:
            bar.close()
        during = getattr(self, "_phase", "boundary") == "step"
        if during:
            self._at_boundary()
        self._restore_streams()
        try:  # this process's own deferred checks (no collective: a peer is gone)
            clean = self.stage.guard.read(collective=False) is None
        except Exception:
            clean = False
        saved = self.save_last() if clean else False
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0]
        sig = getattr(getattr(self, "sig", None), "signum", 0)
        also = f", and this process received {signal.Signals(sig).name}" if sig else ""
        where = f"during iteration {self.iter + 1}" if during else f"at iteration {self.iter}"
        msg = (f"stopping: another process of the run is gone ({first[:200]}) {where}{also}; "
               + (f"last.pt saved at iteration {self.iter} — run the same command again to "
                  "resume" if saved else f"last.pt not written ({self._saved_iter()})"))
        if self.main:
            self.log.info(msg)
        self._write_status(_Stop("peer_failed", None, msg), self.iter)  # rank: unknown
        return runio.EXIT_STATUS["peer_failed"]

    def _write_result(self, path: Path) -> None:
        le = self.last_eval
        result = {"stage": self.cfg.stage, "monitor": self.stage.monitor,
                  "best": {"iter": self.best["iter"], "value": self.best["value"],
                           **(self.best.get("extra") or {})},
                  "last": {"iter": le["iter"], "value": le["value"], **(le.get("extra") or {})},
                  "per_class_last": le["per_class"],
                  "checkpoint_best": "best.pt", "checkpoint_last": "last.pt"}
        for k in ("best", "last"):
            if result[k]["value"] is not None and not math.isfinite(result[k]["value"]):
                result[k]["value"] = None
        exports = self.stage.export(self.run_dir)
        for what, file in exports:
            self.log.info(f"exported {what}: {self.run_dir / file}")
        if exports:
            result["exports"] = {file: what for what, file in exports}
        runio.write_json(path, result)
        self.log.info("result: " + json.dumps(result["best"]) + " best, "
                      + json.dumps(result["last"]) + " last")


def apply_precision(cfg) -> None:
    """`--tf32 on|off` for CUDA convolutions and matmuls (None: PyTorch's own defaults),
    `--dilated-impl`, and `cfg.precision`, what is used, for config.json and the log."""
    set_dilated_impl(getattr(cfg, "dilated_impl", "native"))
    tf32 = getattr(cfg, "tf32", None)
    if tf32 is not None:
        torch.backends.cudnn.allow_tf32 = tf32 == "on"
        torch.backends.cuda.matmul.allow_tf32 = tf32 == "on"
    cfg.precision = {"autocast": getattr(cfg, "amp", None) or "none",
                     "compile": getattr(cfg, "compile", "none"),
                     "cuda_graph": bool(getattr(cfg, "cuda_graph", False)),
                     "dilated_impl": getattr(cfg, "dilated_impl", "native"),
                     "stack_forwards": stacks_forwards(cfg),
                     "sfc_term": ("float32" if getattr(cfg, "sfc_precision", "float32") ==
                                  "float32" else getattr(cfg, "amp", None) or "none"),
                     "tf32_conv": bool(torch.backends.cudnn.allow_tf32),
                     "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}


def train(cfg, data) -> int:
    # Fixed input sizes: let cuDNN pick its fastest kernels (the release leaves cuDNN
    # non-deterministic too, method §5).
    torch.backends.cudnn.benchmark = True
    if getattr(cfg, "threads", None):
        torch.set_num_threads(cfg.threads)
    apply_precision(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, data)
        return trainer.run()
    finally:
        failed = getattr(trainer, "peer_failed", False)
        if trainer is not None:
            trainer.close()
            stage = getattr(trainer, "stage", None)
            if stage is not None:
                stage.ddp.clear()  # the DDP reducers hold the process group
            del trainer, stage
            gc.collect()
        # An orderly end of the process group before the interpreter's: gloo's worker threads
        # otherwise release tensors during finalisation and can abort the process (SIGABRT
        # after a successful run). Not after a peer died: nobody is left to shut down with.
        if not failed:
            dist.cleanup()
