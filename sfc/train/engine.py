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
`last.pt` untouched; a data error (also inside a loader worker) saves `last.pt`, is logged and
exits 2 with the one-line `DatasetError`.

Several processes (torchrun): each draws its own shard of every epoch; the trained networks
are wrapped in `DistributedDataParallel(broadcast_buffers=False)` after the resume (so rank 0's
parameters and buffers are broadcast at the start), the source backward runs under `no_sync()`
when the SFC loss follows (its two forwards, then one backward, reduce the summed gradient
once), frozen networks take no part. BatchNorm running statistics are per rank during training;
rank 0's are broadcast before each evaluation (what is evaluated and saved, as a single GPU's
run would keep the statistics of the batches it saw). Rank 0 does all I/O.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from sfc import dist
from sfc.data.io import DatasetError
from sfc.train import runio, tb_pictures
from sfc.train.stages import NonFiniteLoss, build_stage
from sfc.train.streams import (
    JOB_SIGNALS,
    SignalSafeLoader,
    TrainStream,
    plain_dataset_error,
    to_device,
    worker_init,
)


class _Signals:
    """SIGINT/SIGTERM/SIGUSR1 set a flag; the loop saves last.pt after the current iteration."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in JOB_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _broadcast_buffers(stage) -> None:
    if dist.get_world_size() > 1:
        for net in stage.nets.values():
            for b in net.buffers():
                torch_dist.broadcast(b, 0)


def _any_rank(flag: int, device) -> int:
    if dist.get_world_size() <= 1:
        return flag
    t = torch.tensor([flag], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t.item())


def _per_class(result: dict, class_names) -> dict[str, float] | None:
    if "per_class" not in result:
        return None
    return {n: float(v) for n, v in zip(class_names, result["per_class"])}


def _nonfinite_parameter(named_params) -> str | None:
    """The name of the first trainable parameter holding a NaN/Inf, or None (one sync)."""
    names, params = zip(*named_params) if named_params else ((), ())
    if not params:
        return None
    norms = torch.stack([n.float() for n in torch._foreach_norm(list(params))])
    bad = (~torch.isfinite(norms)).nonzero()
    return names[int(bad[0])] if bad.numel() else None


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
            self._build_loaders(data)
        except BaseException:
            self.close()
            raise
        self.vis_batch = None
        self.iter = 0
        self.best = {"iter": None, "value": None}
        self.last_eval = None

    def _prepare_run_dir(self) -> list[str]:
        """Lock, clean, check the resume (see the module docstring); returns lines for the
        log. Rank 0 changes files; every rank reads `last.pt`."""
        notes = []
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = runio.RunLock(self.run_dir)
            if self.lock.taken_over:
                h = self.lock.taken_over
                notes.append(f"warning: took over the lock of pid {h.get('pid')} on "
                             f"{h.get('host')}, which is no longer running")
            for name, size in runio.remove_stale_temps(self.run_dir):
                notes.append(f"removed {name} ({size / 2**20:.1f} MiB), a temporary file left "
                             "by a killed writer")
        self._resume_ckpt = runio.check_resume(self.run_dir, vars(self.cfg),
                                               self.info.world_size)
        start = self._resume_ckpt["iter"] if self._resume_ckpt else 0
        self._purge_step = start + 1 if (self.run_dir / "tb").is_dir() else None
        if self.main:
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
        val = data.val
        if cfg.val_limit is not None:
            val = Subset(val, range(min(cfg.val_limit, len(val))))
        self.val_loader = SignalSafeLoader(DataLoader(
            val, batch_size=1, sampler=dist.ShardSampler(val), num_workers=cfg.num_workers,
            pin_memory=pin, worker_init_fn=worker_init()))

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
                      last_eval=self.last_eval, rng=runio.rng_state(),
                      streams={k: s.state_dict() for k, s in self.streams.items()})
        return ck

    def save_last(self) -> None:
        if self.main:
            runio.atomic_save(self._ckpt(full=True, metric=self.last_eval),
                              self.run_dir / "last.pt")

    def resume(self) -> bool:
        """Continue from `last.pt` (already checked by `runio.check_resume`)."""
        ck, path = self._resume_ckpt, self.run_dir / "last.pt"
        if ck is None:
            return False
        self.stage.load_saved_state(ck["models"])
        self.stage.optimizer.load_state_dict(ck["optimizer"])
        for k, s in self.streams.items():
            s.load_state_dict(ck["streams"][k])
        runio.set_rng_state(ck["rng"])
        self.iter, self.best, self.last_eval = ck["iter"], ck["best"], ck["last_eval"]
        changed = {k: (ck["config"].get(k), v) for k, v in vars(self.cfg).items()
                   if ck["config"].get(k) != v and k not in ("num_workers", "device")}
        self.log.info(f"resumed from {path} at iteration {self.iter}"
                      + (f"; config changes (old, new): {changed}" if changed else ""))
        self._resume_ckpt = None  # free the memory
        return True

    def _data_error(self, e: DatasetError, where: str, states: dict | None = None):
        """A data error: the streams put back to where this iteration started, `last.pt`
        saved, the error logged; returns the one-line DatasetError to raise."""
        err = plain_dataset_error(e)
        for k, s in (states or {}).items():
            self.streams[k].load_state_dict(s)
        self.save_last()
        self.log.info(f"stopping: data error {where}: {err} — last.pt saved at iteration "
                      f"{self.iter}; fix the file (python -m sfc.data.check) and run the same "
                      "command again to resume")
        return err

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self) -> dict:
        _broadcast_buffers(self.stage)
        res = self.stage.validate(self.val_loader, progress=self.main)
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
            self.log.info(f"iter {self.iter}: val {mon} {value:.4f}{more}"
                          + (" (best)" if better else f" (best {self.best['value']:.4f} "
                             f"at {self.best['iter']})"))
            self._pictures()
            if better:
                runio.atomic_save(self._ckpt(full=False, metric=rec), self.run_dir / "best.pt")
            self.log.flush()
        return rec

    def _evaluate_or_stop(self, bar=None) -> dict:
        try:
            return self.evaluate()
        except DatasetError as e:
            if bar is not None:
                bar.close()
            raise self._data_error(e, f"in the evaluation at iteration {self.iter}") from None

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
        cfg, stage = self.cfg, self.stage
        result_path = self.run_dir / "result.json"
        resumed = self.resume()
        if self.info.world_size > 1:
            stage.wrap_ddp()  # after the resume: rank 0's state is broadcast
        if resumed and self.iter >= cfg.iters and result_path.is_file():
            self.log.info(f"run {self.run_dir} already finished ({self.iter} iterations); "
                          "nothing to do")
            return 0
        if self.main and not resumed:
            runio.write_json(self.run_dir / "config.json",
                             {"config": vars(cfg), "version": runio.code_version(),
                              "world_size": self.info.world_size})
            self.log.info(f"stage {cfg.stage} -> {self.run_dir} ({cfg.iters} iterations, "
                          f"{self.info.world_size} process(es), device {self.device})")
        for note in getattr(self.data, "notes", ()):
            self.log.info(note)
        params = stage.trainable_parameters()
        names = {id(p): n for net in stage.nets.values() for n, p in net.named_parameters()}
        named = [(names.get(id(p), "?"), p) for p in params]
        bar = tqdm(total=cfg.iters, initial=self.iter, disable=not self.main,
                   dynamic_ncols=True, desc=cfg.stage)
        t0 = time.time()
        with _Signals() as sig:
            if (self.iter and self.iter % cfg.eval_every == 0 and self.iter < cfg.iters
                    and (self.last_eval or {}).get("iter") != self.iter):
                self._evaluate_or_stop()  # an evaluation a data error interrupted
            while self.iter < cfg.iters:
                i = self.iter
                stage.train_mode()
                lr = stage.set_iteration_lr(i)
                states = {k: s.state_dict() for k, s in self.streams.items()}
                try:
                    src = to_device(next(self.streams["source"]), self.device)
                    tgt = (to_device(next(self.streams["target"]), self.device)
                           if "target" in self.streams else None)
                except DatasetError as e:
                    bar.close()
                    raise self._data_error(e, f"at iteration {i + 1}", states) from None
                stage.optimizer.zero_grad(set_to_none=True)
                try:
                    terms = stage.train_step(src, tgt)
                except NonFiniteLoss as e:
                    self.log.info(f"stopping: non-finite {e.what} at iteration {i + 1} "
                                  f"(term {e.term!r} = {e.value}), before its backward; last.pt "
                                  f"left untouched ({self._saved_iter()})")
                    bar.close()
                    return 3
                stage.optimizer.step()
                bad = _nonfinite_parameter(named)
                if bad is not None:
                    self.log.info(f"stopping: non-finite parameter {bad!r} after the step of "
                                  f"iteration {i + 1} (term 'parameters'); last.pt left "
                                  f"untouched ({self._saved_iter()})")
                    bar.close()
                    return 3
                self.iter = i + 1
                bar.update(1)
                bar.set_postfix({**{k: f"{v:.4g}" for k, v in terms.items()},
                                 "lr": f"{lr:.2e}"})
                if self.main and (self.iter % cfg.log_every == 0 or self.iter == 1):
                    self.log.metrics({"split": "train", "iter": self.iter, "lr": lr, **terms,
                                      "sec": round(time.time() - t0, 2)})
                    self.log.scalars({**{f"train/loss_{k}": v for k, v in terms.items()},
                                      "train/lr": lr}, self.iter)
                if self.iter % cfg.eval_every == 0 or self.iter == cfg.iters:
                    self._evaluate_or_stop(bar)
                    self.save_last()
                stop = _any_rank(sig.signum or int(self.iter == cfg.stop_after), self.device)
                if stop and self.iter < cfg.iters:
                    self.save_last()
                    why = (signal.Signals(sig.signum).name if sig.signum
                           else f"--stop-after {cfg.stop_after}")
                    self.log.info(f"stopped at iteration {self.iter} ({why}); last.pt saved in "
                                  f"{self.run_dir} — run the same command again to resume")
                    bar.close()
                    return 128 + sig.signum if sig.signum else 0
        bar.close()
        if self.last_eval is None or self.last_eval["iter"] != self.iter:
            self._evaluate_or_stop()  # quirk 1: the final iterate is always evaluated and kept
            self.save_last()
        if self.main:
            self._write_result(result_path)
        dist.barrier()
        return 0

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


def train(cfg, data) -> int:
    # Fixed input sizes: let cuDNN pick its fastest kernels (the release leaves cuDNN
    # non-deterministic too, method §5).
    torch.backends.cudnn.benchmark = True
    trainer = Trainer(cfg, data)
    try:
        return trainer.run()
    finally:
        trainer.close()
