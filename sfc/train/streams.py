"""Endless, resumable training streams over a dataset (the release's "restart the loader with a
new order each epoch").

Each epoch's order is a permutation drawn from `numpy.random.SeedSequence((seed, stream,
epoch))` — the same on every rank, each rank taking its shard as `DistributedSampler` does
(padded by repetition to a multiple of the world size, then every world-size-th index). Seeds,
streams (source 0, target 1) and epochs enter the generator as separate words, so no two of
them share an order: with `seed + epoch` (what `DistributedSampler` does) the runs of seed 0
and seed 1 replayed each other's orders one epoch apart. The state `(epoch, batches consumed)`
is saved in `last.pt`, so a resumed run continues with exactly the samples an uninterrupted run
would have seen.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from sfc.data.io import DatasetError, normalise_batch

# What a cluster sends to every process of a job (scancel, requeue, time limit with --signal):
# the main process saves last.pt and stops; loader workers must not die of them first.
JOB_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


_SHUTDOWN = None  # multiprocessing.Event: set when this process shuts its loader workers down


def _shutdown_event():
    global _SHUTDOWN
    if _SHUTDOWN is None:
        _SHUTDOWN = multiprocessing.get_context().Event()
        # at exit, multiprocessing terminates (SIGTERM) and joins the daemonic workers that are
        # still alive: let them go (atexit runs this before multiprocessing's own handler)
        atexit.register(_SHUTDOWN.set)
    return _SHUTDOWN


class _WorkerSignals:
    """DataLoader `worker_init_fn`: a worker ignores SIGINT and SIGUSR1, and a SIGTERM that
    comes while its main process runs (a job's signal to the whole group: the main process
    saves last.pt and shuts the workers down itself); once the main process has begun to shut
    its workers down, SIGTERM ends the worker as usual. Then it takes the signals that were
    blocked while it was started (`job_signals_blocked`)."""

    def __init__(self, shutdown):
        self.shutdown = shutdown

    def __call__(self, worker_id: int = 0) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._sigterm)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)

    def _sigterm(self, signum, frame) -> None:
        if self.shutdown.is_set():
            os._exit(0)


def worker_init():
    """A picklable worker_init_fn bound to this process's shutdown flag."""
    return _WorkerSignals(_shutdown_event())


def shutdown_loader_workers(iterators) -> None:
    """Stop the workers of DataLoader iterators now (not at interpreter exit): the flag that
    lets them end on SIGTERM is set, then each iterator shuts its workers down."""
    _shutdown_event().set()
    for it in iterators:
        stop = getattr(it, "_shutdown_workers", None)  # multi-process iterators only
        if stop is not None:
            stop()


@contextlib.contextmanager
def job_signals_blocked():
    """Block the job signals while loader workers are started: a forked worker inherits the
    blocked mask, so a signal arriving before its `worker_init_fn` has run cannot kill it; the
    main process receives it when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class SignalSafeLoader:
    """A DataLoader whose workers are started with the job signals blocked (see above); its
    workers must use `worker_init()`. Iterates and has the length of the loader."""

    def __init__(self, loader):
        self.loader = loader
        self.dataset = loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        with job_signals_blocked():
            it = iter(self.loader)
        return it


def plain_dataset_error(e: DatasetError) -> DatasetError:
    """The one-line DatasetError of a worker's failure. PyTorch re-raises a worker's exception
    with the worker's traceback in the message ("Caught DatasetError in DataLoader worker
    process 0. Original Traceback ..."); keep only the original message, as with 0 workers."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.strip().splitlines() if "DatasetError: " in ln]
        if last:
            msg = last[-1].split("DatasetError: ", 1)[1]
    return DatasetError(msg)


class _ListSampler(Sampler):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TrainStream:
    """`next(stream)` → a batch; loops over epochs forever.

    `seed` and `stream` (0 source, 1 target) fix the per-epoch permutations.
    `worker_init_fn` goes to the DataLoader (the engine's makes workers ignore job signals).
    """

    def __init__(self, dataset, batch_size: int = 1, seed: int = 0, stream: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 pin_memory: bool = False, worker_init_fn=None):
        if len(dataset) == 0:
            raise ValueError(f"training dataset {type(dataset).__name__} is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.stream = int(stream)
        self.worker_init_fn = worker_init_fn or worker_init()
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch already returned
        self._it = None

    def order(self, epoch: int) -> list[int]:
        """The whole epoch's permutation (before sharding), identical on every rank."""
        rng = np.random.default_rng(np.random.SeedSequence((self.seed, self.stream, epoch)))
        return rng.permutation(len(self.dataset)).tolist()

    def _indices(self, epoch: int) -> list[int]:
        idx = self.order(epoch)
        total = -(-len(idx) // self.world_size) * self.world_size
        idx += (idx * (-(-total // len(idx))))[: total - len(idx)]  # pad as DistributedSampler
        return idx[self.rank:total:self.world_size]

    def _start(self) -> None:
        idx = self._indices(self.epoch)[self.consumed * self.batch_size:]
        loader = DataLoader(self.dataset, batch_size=self.batch_size,
                            sampler=_ListSampler(idx), num_workers=self.num_workers,
                            pin_memory=self.pin_memory, drop_last=False,
                            persistent_workers=False, worker_init_fn=self.worker_init_fn)
        with job_signals_blocked():
            self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.consumed = 0
            self._start()
            batch = next(self._it)
        self.consumed += 1
        return batch

    def close(self) -> None:
        """Shut the loader workers down (the engine calls it when the run ends)."""
        if self._it is not None:
            shutdown_loader_workers([self._it])
            self._it = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "stream": self.stream, "order": "seedsequence-v1"}

    def load_state_dict(self, state: dict) -> None:
        have = (state.get("seed"), state.get("stream"), state.get("order"))
        if have != (self.seed, self.stream, "seedsequence-v1"):
            raise ValueError(f"data-order mismatch on resume: checkpoint (seed, stream, order) "
                             f"{have}, run {(self.seed, self.stream, 'seedsequence-v1')}")
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])
        self._it = None


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch's tensors to `device`; a raw "bgr" clip (datasets built with `raw=True`, as
    training does) becomes "seg" and "flow" there, bit-identical to the float path."""
    moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
             for k, v in batch.items()}
    return normalise_batch(moved)
