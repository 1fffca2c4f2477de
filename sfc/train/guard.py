"""Finiteness checks of the training step, with or without a host sync per iteration (issue 18).

Every iteration checks its loss terms and flows (before the backward) and the trained
parameters (after the optimiser step). How the answer reaches the host is set by
`--check-every N`:

* **N = 1** (the default on the CPU, and the behaviour before issue 18): each check is read at
  once. A non-finite loss or flow stops the run before its backward; a non-finite parameter
  right after the step. One host sync per check, so several per iteration: on a GPU each one
  drains the queue of launched kernels.
* **N > 1** (the default on CUDA: `auto` = 50): the checks leave flags on the device, nothing
  is read. After the optimiser step the whole update of the iteration is **discarded on the
  device** when any flag of this iteration or of an earlier one is set (the parameters are
  put back to their values before the step with one `torch.where` over a flat copy: exact,
  no sync), as `GradScaler` skips a step with an overflow, except that here the skip is sticky:
  from the first bad iteration on, the parameters stay those before it. The flags are read
  (one sync) every N iterations, at every training-log line, before every evaluation and
  every save of `last.pt` (a signal, `--stop-after`, a data error, the end of the run). A read
  that finds a bad iteration stops the run with exit 3, naming the first bad iteration, term
  and rank; `last.pt` is untouched, because every save reads the flags first, and holds the
  state of a boundary before that iteration.

What N > 1 guarantees, exactly: no non-finite update reaches the parameters, `last.pt` or
`best.pt`; the stop comes at most N iterations (or one log interval) after the bad one; the
message names the same iteration and term as N = 1 would (the first bad one). What it does
not: BatchNorm running statistics and optimiser buffers (momentum, Adam moments) after the
bad iteration are not restored in memory — they are never saved either, since the run stops
at the read. On the CPU a non-finite flow is still read at once, before its backward, with any N:
`grid_sample` with border padding crashes (segmentation fault) in the CPU backward of NaN
coordinates, and a sync costs nothing there (`flows_at_once`; the CPU emulation of a CUDA graph,
`sfc.train.graphed.TapeBackend`, turns it off to run the CUDA program). On a finite run the
trajectory is bit-identical for every N (the discarded-update selection keeps each value as it
is).
"""

from __future__ import annotations

import torch

from sfc import dist

DEFAULT_CUDA_EVERY = 50


class NonFiniteLoss(RuntimeError):
    """A NaN/Inf found before a backward pass: `what` is "loss" or "flow", `term` its name,
    `rank` the first process that found it (every process raises it together)."""

    def __init__(self, term: str, value: float, what: str = "loss", rank: int = 0):
        super().__init__(f"non-finite {what} term {term!r} = {value}")
        self.term, self.value, self.what, self.rank = term, value, what, rank


def resolve_every(every, device: torch.device) -> int:
    """`--check-every`: "auto" → 1 on the CPU (a sync costs nothing there), 50 on CUDA."""
    if every in (None, "auto"):
        return 1 if torch.device(device).type == "cpu" else DEFAULT_CUDA_EVERY
    n = int(every)
    if n < 1:
        raise ValueError(f"--check-every must be >= 1 or auto, got {every!r}")
    return n


def bad_rank(bad: torch.Tensor | bool) -> int | None:
    """The first process on which `bad` holds, or None (one sync, one small all-reduce): all
    ranks stop together (none is left waiting in a collective of the backward pass)."""
    rows = dist.gather_rows([int(bool(bad))])
    return next((r for r, (flag,) in enumerate(rows) if flag), None)


class FiniteGuard:
    """The finiteness checks of one training run (see the module docstring)."""

    def __init__(self, device: torch.device, every: int = 1):
        self.device = torch.device(device)
        self.every = int(every)
        self.deferred = self.every > 1
        # N > 1: flows still read at once on the CPU (module docstring)
        self.flows_at_once = self.device.type == "cpu"
        self.names: list[tuple[str, str]] = []  # code → (what, term)
        self._flags: list[tuple[int, torch.Tensor]] = []  # this iteration's (code, bad)
        self._codes: dict[tuple[int, ...], torch.Tensor] = {}
        self.first_iter: torch.Tensor | None = None  # 0-based iteration of the first bad, -1
        self.first_code: torch.Tensor | None = None

    def _code(self, what: str, term: str) -> int:
        key = (what, term)
        if key not in self.names:
            self.names.append(key)
        return self.names.index(key)

    # -- the checks ---------------------------------------------------------------------
    def loss(self, term: str, loss: torch.Tensor) -> torch.Tensor:
        """Check one loss term before its backward; returns it."""
        bad = ~torch.isfinite(loss.detach()).all()
        if self.deferred:
            self._flags.append((self._code("loss", term), bad))
            return loss
        rank = bad_rank(bad)
        if rank is not None:
            raise NonFiniteLoss(term, float(loss.detach().float().item()), rank=rank)
        return loss

    def flow(self, term: str, flags: list[torch.Tensor]) -> None:
        """Check a network's recorded output flags (a FlowNet's flows) before the backward;
        read at once on the CPU whatever N (see the module docstring)."""
        if not flags:
            return
        bad = torch.stack(flags).any()
        if self.deferred and not self.flows_at_once:
            self._flags.append((self._code("flow", term), bad))
            return
        rank = bad_rank(bad)
        if rank is not None:
            raise NonFiniteLoss(term, float("nan"), what="flow", rank=rank)

    def term(self, loss: torch.Tensor):
        """A loss term for the log: a float (N = 1) or a detached device tensor (N > 1, read
        with the flags)."""
        return loss.detach() if self.deferred else float(loss.detach())

    # -- the optimiser step -----------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, named_params,
             i: int | torch.Tensor) -> str | None:
        """The optimiser step of 0-based iteration `i` (a number, or a 0-d int64 tensor on the
        device that a captured step fills before each replay) and the parameter check. N = 1: the
        step, then the name of the first non-finite parameter or None (one sync). N > 1: the
        step, its update discarded on the device if this or an earlier iteration was bad;
        returns None (the flags are read by `read`)."""
        names = [n for n, _ in named_params]
        params = [p for _, p in named_params]
        if not self.deferred:
            self._flags = []
            optimizer.step()
            return first_nonfinite(names, params)
        with torch.no_grad():
            before = torch.cat([p.detach().reshape(-1) for p in params]) if params else None
            optimizer.step()
            flags = list(self._flags)
            self._flags = []
            if params:
                flags.append((self._code("parameter", "parameters"),
                              ~torch.isfinite(_norms(params)).all()))
            if not flags:
                return None
            if self.first_iter is None:
                self.first_iter = torch.full((), -1, dtype=torch.int64, device=self.device)
                self.first_code = torch.full((), -1, dtype=torch.int64, device=self.device)
            stacked = torch.stack([b for _, b in flags])
            codes = tuple(c for c, _ in flags)
            if codes not in self._codes:
                self._codes[codes] = torch.tensor(codes, dtype=torch.int64, device=self.device)
            code_now = torch.index_select(self._codes[codes], 0,
                                          stacked.to(torch.int64).argmax().view(1))[0]
            bad_now = stacked.any()
            earlier = self.first_iter >= 0
            new = bad_now & ~earlier
            # in place: a captured step (sfc.train.graphed) reads and writes these same tensors
            # at every replay; `i` may be a 0-d device tensor there
            self.first_iter.copy_(torch.where(new, i, self.first_iter))
            self.first_code.copy_(torch.where(new, code_now, self.first_code))
            if params:
                skip = bad_now | earlier
                after = torch.cat([p.detach().reshape(-1) for p in params])
                kept = torch.where(skip, before, after)
                sizes = [p.numel() for p in params]
                torch._foreach_copy_(params, [c.view(p.shape) for c, p in
                                              zip(kept.split(sizes), params)])
        return None

    def read(self, collective: bool = True) -> tuple[int, str, str, int] | None:
        """The first bad iteration so far as (1-based iteration, what, term, rank), or None.
        One sync; with `collective` (every rank calls it at the same point) the ranks agree
        on the earliest (then lowest-rank) one."""
        if not self.deferred:
            return None
        if self.first_iter is None:
            it, code = -1, -1
        else:
            it, code = torch.stack([self.first_iter, self.first_code]).tolist()
        rows = dist.gather_rows([it, code]) if collective else [[it, code]]
        bad = [(r_it, rank, r_code) for rank, (r_it, r_code) in enumerate(rows) if r_it >= 0]
        if not bad:
            return None
        it, rank, code = min(bad)
        what, term = self.names[code] if 0 <= code < len(self.names) else ("?", "?")
        return it + 1, what, term, rank


def _norms(params) -> torch.Tensor:
    """Each tensor's 2-norm (float32, on the device; NaN/Inf where the tensor has one)."""
    return torch.stack([n.float() for n in torch._foreach_norm(list(params))])


def first_nonfinite(names, params) -> str | None:
    """The name of the first parameter holding a NaN/Inf, or None (one sync)."""
    if not params:
        return None
    bad = (~torch.isfinite(_norms(params))).nonzero()
    return names[int(bad[0])] if bad.numel() else None


__all__ = ["DEFAULT_CUDA_EVERY", "FiniteGuard", "NonFiniteLoss", "bad_rank",
           "first_nonfinite", "resolve_every"]
