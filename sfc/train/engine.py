"""The one training loop of every stage: data streams, LR, step, evaluation, checkpoints,
logging, resume, signals, multi-process.

Per iteration i (0-based): set the stage's LR for i → source (+ target) losses, each
back-propagated separately (`stage.train_step`) → [several processes: average the trainable
gradients] → one optimiser step. After iteration i+1 ≡ 0 (mod eval_every), and always after the
last iteration: evaluate, write `best.pt` on a strict improvement, write `last.pt`.

Several processes (torchrun): each draws its own shard of every epoch (`DistributedSampler`);
the gradients of the trainable parameters are all-reduced (mean) before the step — done by hand
rather than with DDP because the SFC losses call the network twice before one backward, which
DDP's reducer does not allow; frozen networks take no part. BatchNorm buffers are broadcast from
rank 0 before each evaluation. Rank 0 does all I/O.
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
from sfc.train import runio, tb_pictures
from sfc.train.stages import NonFiniteLoss, build_stage
from sfc.train.streams import TrainStream, to_device


class _Signals:
    """SIGINT/SIGTERM set a flag; the loop saves last.pt after the current iteration."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
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


def _sync_grads(params) -> None:
    world = dist.get_world_size()
    if world <= 1:
        return
    for p in params:
        if p.grad is None:  # every rank must take part in the same collective
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():  # one flat all-reduce per dtype instead of one per tensor
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch_dist.all_reduce(flat)
        flat.div_(world)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


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


class Trainer:
    def __init__(self, cfg, data):
        """`cfg`: resolved config namespace (sfc.train); `data`: object with `source`, `target`
        (or None), `val` datasets and `protocol`."""
        self.cfg = cfg
        self.info = dist.init_distributed(cfg.device)
        self.main = self.info.rank == 0
        self.device = self.info.device
        self.run_dir = Path(cfg.out)
        self.log = runio.RunLogger(self.run_dir, enabled=self.main)
        self.data = data
        runio.seed_everything(cfg.seed)
        self.stage = build_stage(cfg, self.device, log=self.log.info)
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
        self.val_loader = DataLoader(val, batch_size=1, sampler=dist.ShardSampler(val),
                                     num_workers=cfg.num_workers, pin_memory=pin)
        self.vis_batch = None
        self.iter = 0
        self.best = {"iter": None, "value": None}
        self.last_eval = None

    # ---- checkpoints ------------------------------------------------------------------
    def _ckpt(self, full: bool, metric: dict | None = None) -> dict:
        ck = {"format": runio.CHECKPOINT_FORMAT, "stage": self.cfg.stage, "iter": self.iter,
              "models": self.stage.saved_state(), "config": vars(self.cfg),
              "version": runio.code_version(), "metric": metric}
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
        path = self.run_dir / "last.pt"
        if not path.is_file():
            return False
        ck = runio.load_checkpoint(path)
        if ck["stage"] != self.cfg.stage:
            raise ValueError(f"{path} belongs to stage {ck['stage']!r}, not {self.cfg.stage!r}; "
                             "use another --out")
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
        return True

    # ---- evaluation -------------------------------------------------------------------
    def evaluate(self) -> dict:
        _broadcast_buffers(self.stage)
        res = self.stage.validate(self.val_loader, progress=self.main)
        mon = self.stage.monitor
        value = float(res[mon])
        names = self.data.protocol.class_names if self.data.protocol else []
        rec = {"iter": self.iter, "value": value, "monitor": mon,
               "per_class": _per_class(res, names)}
        self.last_eval = rec
        better = (self.best["value"] is None
                  or (value > self.best["value"] if self.stage.higher_is_better
                      else value < self.best["value"]))
        if better:
            self.best = {"iter": self.iter, "value": value}
        if self.main:
            self.log.metrics({"split": "val", "iter": self.iter, mon: value,
                              "per_class": rec["per_class"], "best": better})
            scalars = {f"val/{mon}": value}
            for n, v in (rec["per_class"] or {}).items():
                scalars[f"val_iou/{n}"] = v
            self.log.scalars(scalars, self.iter)
            self.log.info(f"iter {self.iter}: val {mon} {value:.4f}"
                          + (" (best)" if better else f" (best {self.best['value']:.4f} "
                             f"at {self.best['iter']})"))
            self._pictures()
            if better:
                runio.atomic_save(self._ckpt(full=False, metric=rec), self.run_dir / "best.pt")
            self.log.flush()
        return rec

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
        bar = tqdm(total=cfg.iters, initial=self.iter, disable=not self.main,
                   dynamic_ncols=True, desc=cfg.stage)
        t0 = time.time()
        with _Signals() as sig:
            while self.iter < cfg.iters:
                i = self.iter
                stage.train_mode()
                lr = stage.set_iteration_lr(i)
                src = to_device(next(self.streams["source"]), self.device)
                tgt = (to_device(next(self.streams["target"]), self.device)
                       if "target" in self.streams else None)
                stage.optimizer.zero_grad(set_to_none=True)
                try:
                    terms = stage.train_step(src, tgt)
                except NonFiniteLoss as e:
                    self.log.info(f"stopping: non-finite loss at iteration {i + 1} "
                                  f"(term {e.term!r} = {e.value}); last.pt left untouched "
                                  f"(iteration {self.iter} at most)")
                    bar.close()
                    return 3
                _sync_grads(params)
                stage.optimizer.step()
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
                    self.evaluate()
                    self.save_last()
                stop = _any_rank(sig.signum or int(self.iter == cfg.stop_after), self.device)
                if stop and self.iter < cfg.iters:
                    self.save_last()
                    why = (signal.Signals(sig.signum).name if sig.signum
                           else f"--stop-after {cfg.stop_after}")
                    self.log.info(f"stopped at iteration {self.iter} ({why}); last.pt saved — "
                                  "run the same command again to resume")
                    bar.close()
                    return 128 + sig.signum if sig.signum else 0
        bar.close()
        if self.last_eval is None or self.last_eval["iter"] != self.iter:
            self.evaluate()  # quirk 1: the final iterate is always evaluated and kept
            self.save_last()
        if self.main:
            self._write_result(result_path)
        dist.barrier()
        return 0

    def _write_result(self, path: Path) -> None:
        le = self.last_eval
        result = {"stage": self.cfg.stage, "monitor": self.stage.monitor,
                  "best": {"iter": self.best["iter"], "value": self.best["value"]},
                  "last": {"iter": le["iter"], "value": le["value"]},
                  "per_class_last": le["per_class"],
                  "checkpoint_best": "best.pt", "checkpoint_last": "last.pt"}
        for k in ("best", "last"):
            if result[k]["value"] is not None and not math.isfinite(result[k]["value"]):
                result[k]["value"] = None
        runio.write_json(path, result)
        self.log.info("result: " + json.dumps(result["best"]) + " best, "
                      + json.dumps(result["last"]) + " last")


def train(cfg, data) -> int:
    # Fixed input sizes: let cuDNN pick its fastest kernels (the release leaves cuDNN
    # non-deterministic too, SPEC §5).
    torch.backends.cudnn.benchmark = True
    trainer = Trainer(cfg, data)
    try:
        return trainer.run()
    finally:
        trainer.log.close()
