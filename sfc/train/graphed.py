"""The whole training iteration as one CUDA graph (`--cuda-graph`, issue 18).

At batch 1 an iteration of the SegNet and Accel stages is thousands of small kernels (SFC stage
one: about 6,400), each launched by the CPU. Captured once as a CUDA graph, an iteration is one
launch: forward passes, both backward passes, the optimiser step and the finiteness checks
(deferred: flags on the device, sfc.train.guard) replay with no Python and no per-kernel launch
cost. What it takes, and how this module provides it:

* **Fixed inputs.** A graph reads and writes fixed addresses: each iteration's batch is copied
  into the static batch of the capture (sizes are fixed: batch 1 at the stage's source and
  target sizes; another shape is an error naming the entry).
* **No host syncs and no Python decisions inside.** The deferred checks leave flags on the device
  (a CUDA test runs a whole iteration of each SegNet/Accel stage kind under
  `torch.cuda.set_sync_debug_mode("error")`); the check and LR of the iteration are device
  tensors filled before each replay: the guard's iteration number (`FiniteGuard.step` takes a
  0-d tensor) and one LR tensor per optimiser group (`RepeatedSGD.use_lr_tensors`, filled by
  `optim.set_lr`). State that lives across iterations (momentum buffers, BatchNorm statistics,
  the guard's first bad iteration) is updated in place.
* **Warm-up before capture.** The first `WARMUP` iterations of every run (and of every resumed
  run) are eager, on the stream the capture then uses: cuDNN picks its algorithms, the
  momentum buffers exist (the first SGD step creates them, a different program from the later
  ones), the guard's tensors are made. The next iteration is captured, then replayed for its
  own update; every later one is replayed.

Not supported, each refused up front with the reason (`unsupported`): the CPU; several
processes (DDP's communication is not captured here); the SFM stage (each step reads on the
host which label classes its batch holds); the flownet stage (Adam: not prepared for capture);
`--check-every 1` (reads each check on the host); `--compile reduce-overhead` (its own CUDA
graphs would be captured inside this one). Numerics: the same step, except the SGD update
`p − (lr·d)` with a tensor LR (`use_lr_tensors`: within float32 rounding of the eager step, not
bit-identical); warm-up and replays use the same update, so a resumed run follows the same
program as an uninterrupted one.

Several runs in one process (the benchmark's `--side-by-side-mode streams`): each runner's
graph is captured on its own stream; `runner(i, batch, concurrent=True)` launches the replay
there after the current stream's work (the batch copied in) without waiting for it, and
`join()` makes the current stream wait — launched together, two runs' kernels can overlap on
the device, which two processes' kernels cannot without MPS.

On the CPU (tests, the benchmark's dry run) `TapeBackend` emulates a graph op by op: what goes
stale or cannot be captured in a real graph goes stale or is refused there too.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sfc.train.guard import resolve_every

WARMUP = 3  # eager iterations before the capture (each run, each resume)
STAGES = ("segnet", "accel")


def unsupported(cfg, device: torch.device, world_size: int = 1) -> str | None:
    """Why `--cuda-graph` cannot run with this config, or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"--cuda-graph needs a CUDA device, got --device {device}"
    if world_size > 1:
        return (f"--cuda-graph runs in one process (got {world_size}): the several-process "
                "path's gradient all-reduce is not captured")
    if cfg.stage not in STAGES:
        why = {"sfm": "its step reads on the host which label classes the batch holds",
               "flownet": "its Adam step is not prepared for capture"}.get(cfg.stage, "")
        return (f"--cuda-graph applies to the segnet and accel stages, not {cfg.stage}"
                + (f" ({why})" if why else ""))
    if getattr(cfg, "compile", "none") == "reduce-overhead":
        return ("--cuda-graph with --compile reduce-overhead: both capture CUDA graphs (one "
                "inside the other); use --compile default or none with it")
    if resolve_every(getattr(cfg, "check_every", "auto"), device) == 1:
        return ("--cuda-graph needs the deferred finiteness checks (--check-every N > 1 or "
                "auto); --check-every 1 reads every check on the host")
    return None


class CudaGraphBackend:
    """Warm-up, capture and replay on one side stream of `device` (warm-up and capture on the
    same stream: the libraries' per-stream handles and workspaces exist before the capture)."""

    executes_capture = False  # a capture records the kernels; it does not run them

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.graph = None

    @contextlib.contextmanager
    def warm(self):
        cur = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            yield
        cur.wait_stream(self.stream)

    def capture(self, fn):
        cur = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(cur)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loaders' pin-memory threads may call CUDA during the capture
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        self.graph = graph
        return out

    def replay(self, concurrent: bool = False) -> None:
        """Launch the graph. On the current stream, or with `concurrent` on this backend's own
        stream after the current stream's work so far (the batch copied in), not joined: graphs
        of several backends launched so run at the same time; `join` before reading results."""
        if not concurrent:
            self.graph.replay()
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            self.graph.replay()

    def join(self) -> None:
        """The current stream waits for this backend's stream (after a concurrent replay)."""
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


# aten ops that make the host wait for the device (a device → host read): a scalar read
# (`.item()`, `float()`, `bool()` of a tensor), or an output whose size depends on the data.
# The profiler counts these per iteration (sfc.bench.measure.SYNC_OPS).
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
            "unique_consecutive", "unique_dim")
# aten ops a CUDA graph cannot record: those, and the ones that reach the dispatcher without
# one of them (a sync, refused during a capture), or bring host data in (a copy from pageable
# memory: refused, or garbage)
HOST_READS = frozenset(SYNC_OPS) | {"equal", "is_nonzero", "bincount"}
HOST_DATA = frozenset({"lift_fresh", "lift_fresh_copy"})


def _bool_index(name: str, args) -> bool:
    """Indexing with a boolean mask (`x[mask]`): its size depends on the data (a `nonzero`)."""
    return (name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1
            and any(torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8)
                    for t in args[1] or ()))


class NotCapturable(RuntimeError):
    """An op inside the captured iteration that a CUDA graph cannot record."""


class _Tape(TorchDispatchMode):
    """Records every aten op below autograd (forward and backward) with its arguments and
    outputs; refuses the ones a capture cannot record. Host-side ops (the profiler's ranges)
    are not device work: not recorded, as a graph drops them."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_READS or name in HOST_DATA or _bool_index(name, args):
            why = ("makes a tensor from host data (a copy from pageable memory)"
                   if name in HOST_DATA else "reads a device value on the host (a sync)")
            raise NotCapturable(f"{func} {why}: a CUDA graph cannot capture it")
        out = func(*args, **kwargs)
        if func.namespace != "profiler":
            self.ops.append((func, args, kwargs, out))
        return out


class TapeBackend:
    """A CUDA graph emulated on the CPU, for tests and the benchmark's dry run. The "capture"
    runs `fn` once and records every aten op it performs (`_Tape`); a "replay" re-runs the
    recorded ops with their recorded arguments and writes each result into the tensor the
    capture produced, in place — what a graph does: the same kernels, on the same tensors
    ("addresses"), with every Python value (a float, a size, a branch taken) frozen as it was at
    the capture; no Python of the step runs again. So a value the step takes from Python that
    changes between iterations, or Python state reassigned instead of updated in place, goes
    stale here as it would in a graph, and a host read or a tensor made from host data inside
    the step is refused (`NotCapturable`) as a capture would. Not emulated: streams and memory
    pools, and CPU work a graph would drop (everything here is CPU work)."""

    executes_capture = True
    emulates_cuda = True  # the step is the CUDA one (sfc.train.guard: flows deferred too)

    def __init__(self, device=None):
        self.ops = None

    def warm(self):
        return contextlib.nullcontext()

    def capture(self, fn):
        tape = _Tape()
        with tape:
            out = fn()
        self.ops = tape.ops
        return out

    def join(self) -> None:  # one stream: a "concurrent" replay has run already
        pass

    def replay(self, concurrent: bool = False) -> None:
        with torch.no_grad():
            for func, args, kwargs, old in self.ops:
                new = func(*args, **kwargs)
                for o, n in zip(pytree.tree_leaves(old), pytree.tree_leaves(new)):
                    # a view or an in-place result shares the storage: already up to date
                    if torch.is_tensor(o) and (o.untyped_storage().data_ptr()
                                               != n.untyped_storage().data_ptr()):
                        o.copy_(n)


def _leaves(batch):
    """(path, tensor) of every tensor of a batch `(src dict, tgt dict or None)`."""
    for bi, part in enumerate(batch):
        for k, v in (part or {}).items():
            if torch.is_tensor(v):
                yield f"{('source', 'target')[bi]}[{k!r}]", v


def _clone(batch):
    return tuple(None if part is None else
                 {k: (v.clone() if torch.is_tensor(v) else v) for k, v in part.items()}
                 for part in batch)


class GraphedStep:
    """One training iteration of `stage` (a SegNet or Accel stage with deferred checks) as a
    CUDA graph after `warmup` eager iterations. `__call__(i, batch)` runs 0-based iteration
    `i` on `batch` (its LR already set by `stage.set_iteration_lr(i)`, train mode by
    `stage.train_mode()`, as the engine does) and returns the loss terms as device tensors
    (read them before the next call: a replay overwrites them)."""

    def __init__(self, stage, warmup: int = WARMUP, backend=None):
        if warmup < 1:
            raise ValueError("a captured step needs at least one eager warm-up iteration "
                             "(the first SGD step creates the momentum buffers)")
        if not stage.guard.deferred:
            raise ValueError("a captured step needs the deferred finiteness checks "
                             "(--check-every N > 1)")
        if not hasattr(stage.optimizer, "use_lr_tensors"):
            raise ValueError(f"stage {stage.kind}: its optimiser "
                             f"({type(stage.optimizer).__name__}) has no LR tensors")
        self.stage, self.warmup = stage, int(warmup)
        self.backend = backend if backend is not None else CudaGraphBackend(stage.device)
        if getattr(self.backend, "emulates_cuda", False):
            stage.guard.flows_at_once = False  # the program a CUDA graph captures
        self.iter_t = torch.zeros((), dtype=torch.int64, device=stage.device)
        stage.optimizer.use_lr_tensors()
        self.warm_done = 0
        self.static = None  # the batch the graph reads (after the capture)
        self.terms = None  # the loss terms the graph writes
        self.capture_s: float | None = None  # seconds the capture took

    @property
    def captured(self) -> bool:
        return self.static is not None

    @property
    def calls_to_capture(self) -> int:
        """Calls left until the graph exists (the capture's call included)."""
        return 0 if self.captured else self.warmup - self.warm_done + 1

    def _body(self, src, tgt) -> dict:
        st = self.stage
        st.optimizer.zero_grad(set_to_none=True)  # the capture's backward allocates the grads
        terms = st.train_step(src, tgt)
        st.optimizer_step(self.iter_t)
        return terms

    def __call__(self, i: int, batch, concurrent: bool = False) -> dict:
        """`concurrent`: a replay is launched on the backend's own stream and not joined, so
        that the graphs of several runs in one process replay at the same time
        (`sfc.bench --side-by-side-mode streams`); call `join()` before reading the terms or the
        state, or before the next call. Warm-up and capture calls complete as usual."""
        self.iter_t.fill_(i)
        if not self.captured and self.warm_done < self.warmup:
            with self.backend.warm():
                terms = self._body(*batch)
            self.warm_done += 1
            return terms
        if not self.captured:
            static = _clone(batch)
            t0 = time.perf_counter()
            try:
                self.terms = self.backend.capture(lambda: self._body(*static))
            except Exception as e:
                raise RuntimeError(
                    f"--cuda-graph: capturing iteration {i + 1} failed ({type(e).__name__}: "
                    f"{e}); last.pt holds the last evaluation's state — run again without "
                    "--cuda-graph, and please report this with the log") from e
            self.static = static
            self.capture_s = time.perf_counter() - t0
            if self.backend.executes_capture:
                return self.terms
        else:
            self._copy_in(batch)
        self.backend.replay(concurrent=concurrent)
        return self.terms

    def join(self) -> None:
        """The current stream waits for this runner's concurrent replay."""
        self.backend.join()

    def _copy_in(self, batch) -> None:
        have = dict(_leaves(self.static))
        got = dict(_leaves(batch))
        if have.keys() != got.keys():
            raise ValueError(f"--cuda-graph: the batch has entries {sorted(got)}, the captured "
                             f"one {sorted(have)}")
        for k, v in got.items():
            s = have[k]
            if v.shape != s.shape or v.dtype != s.dtype:
                raise ValueError(f"--cuda-graph: batch entry {k} is {tuple(v.shape)} "
                                 f"{v.dtype}, the graph was captured for {tuple(s.shape)} "
                                 f"{s.dtype} (a captured step needs fixed input sizes)")
            s.copy_(v, non_blocking=True)


__all__ = ["CudaGraphBackend", "GraphedStep", "NotCapturable", "STAGES", "TapeBackend",
           "WARMUP", "unsupported"]
