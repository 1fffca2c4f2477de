"""Multi-process helpers (torchrun). The single-process path runs the same code.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init_distributed` detects them and starts NCCL (CUDA) or gloo (CPU). Without them every
helper degrades to a no-op: ``all_reduce_sum`` returns its input, ``is_main()`` is True.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_dist",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "all_reduce_sum",
    "gather_rows",
    "gather_objects",
    "agreed",
    "is_peer_failure",
    "cleanup",
    "ShardSampler",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool


def _default_device(device, local_rank: int) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device=None, backend: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun; return where this process runs.

    ``device``: ``None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``"cuda"``
    becomes ``cuda:LOCAL_RANK``. ``backend``: ``None`` → ``nccl`` on CUDA, ``gloo`` on CPU.
    Calling it again (or after the group was started elsewhere) returns the same answer.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        dev = _default_device(device, local_rank)
        return DistInfo(rank, world_size, local_rank, dev, world_size > 1)
    if world_size <= 1:
        return DistInfo(0, 1, 0, _default_device(device, 0), False)
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun "
            "(e.g. `torchrun --nproc_per_node=4 -m sfc.evaluate ...`)"
        )
    dev = _default_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    global _HOST_GROUP
    # the ranks' per-iteration agreement (a few ints) goes through a CPU (gloo) group beside
    # NCCL: a CUDA tensor there would stall the launch queue of every training step
    _HOST_GROUP = dist.new_group(backend="gloo") if backend == "nccl" else None
    return DistInfo(rank, world_size, local_rank, dev, True)


_HOST_GROUP = None  # gloo group for host-side agreement when the main backend is NCCL


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that does all I/O."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place; returns it. A no-op in a single process.

    Integer tensors (confusion matrices, counts) sum exactly, so the sharded result equals the
    single-process one bit for bit.
    """
    if is_dist() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend() == "nccl" and _HOST_GROUP is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(row: list[int]) -> list[list[int]]:
    """Every process's `row` of ints, on every process (one all-reduce of a world × len
    tensor); `[row]` in a single process. How the ranks agree on why (and whether) to stop.
    Under NCCL it runs on the CPU group beside it (no CUDA stream involved: no stall of the
    training step's queued kernels)."""
    if not (is_dist() and get_world_size() > 1):
        return [[int(v) for v in row]]
    t = torch.zeros(get_world_size(), len(row), dtype=torch.int64, device=_collective_device())
    t[get_rank()] = torch.tensor([int(v) for v in row], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_HOST_GROUP)
    return t.cpu().tolist()


def gather_objects(obj) -> list:
    """Every process's picklable `obj` (e.g. an error message), on every process."""
    if not (is_dist() and get_world_size() > 1):
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_HOST_GROUP)
    return out


def agreed(loader, errors=None):
    """Iterate `loader`; an error of the types in `errors` (default: `DatasetError`) ends this
    process's loop, and when the loop ends every process learns whether any failed: then all
    raise the same error (the first failing rank's message, naming that rank when there are
    several). Put it around an evaluation loader whose loop ends in a collective, so a file
    only one rank reads cannot leave the others waiting in that collective."""
    if errors is None:
        from sfc.data.io import DatasetError

        errors = (DatasetError,)
    err = None
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except errors as e:
            err = e
            break
        yield batch
    raise_if_any(err)


def raise_if_any(err: BaseException | None, cls: type | None = None) -> None:
    """Collective: raise on every process when `err` is set on any. A failing rank raises its
    own exception; the others `cls` (default: DatasetError for a data error, else
    RuntimeError) with the first failing rank's message and "(on rank N)"."""
    if not (is_dist() and get_world_size() > 1):
        if err is not None:
            raise err
        return
    rows = gather_rows([int(err is not None)])
    bad = [r for r, (flag,) in enumerate(rows) if flag]
    if not bad:
        return
    from sfc.flags import one_line

    msgs = gather_objects(None if err is None else (type(err).__name__, one_line(err)))
    kind, msg = msgs[bad[0]]
    if err is not None:
        raise err
    from sfc.data.io import DatasetError

    cls = cls or (DatasetError if kind == "DatasetError" else RuntimeError)
    raise cls(f"{msg} (on rank {bad[0]})")


def is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another process is gone (gloo: "Connection closed by
    peer"; NCCL: a DistBackendError), in a multi-process run."""
    if not (is_dist() and get_world_size() > 1):
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    msg = str(error)
    return isinstance(error, RuntimeError) and any(
        s in msg for s in ("Connection closed by peer", "Connection reset by peer", "gloo",
                           "NCCL", "Broken pipe"))


def cleanup() -> None:
    global _HOST_GROUP
    if is_dist():
        dist.destroy_process_group()
    _HOST_GROUP = None


class ShardSampler(Sampler):
    """Deterministic, non-padding shard of ``range(n)``: ``indices[rank::world_size]``.

    Unlike ``DistributedSampler`` (which pads by repeating images so that every rank gets the
    same count), every image is seen exactly once over all ranks — required for an exact
    all-reduced confusion matrix. ``data`` is a dataset (anything with ``len``) or an int.
    """

    def __init__(self, data, rank: int | None = None, world_size: int | None = None):
        self.n = data if isinstance(data, int) else len(data)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world size {self.world_size}")

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))
