"""Progress of long work: a tqdm bar on a terminal, one plain line every N seconds in a job log.

With stderr not a terminal (a batch job's log file) a redrawn bar writes thousands of carriage
returns into the log; `--progress lines` (what `auto` picks there) prints instead
``segnet: iteration 1200/80000 (1.5 %), seg 0.412, lr 2.49e-04, 3.21 it/s, ETA 6:48:10`` every
`every` seconds and once at the end.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

MODES = ("auto", "bar", "lines", "none")


def resolve_mode(mode: str | None, stream=None) -> str:
    """`auto` → `bar` on a terminal, else `lines`."""
    mode = mode or "auto"
    if mode == "auto":
        stream = stream or sys.stderr
        return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"
    return mode


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LineProgress:
    """The part of tqdm's interface the training loop uses (`update`, `set_postfix`,
    `close`), printing one line every `every` seconds."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", every: float = 30.0,
                 file=None, clock=time.monotonic):
        self.total, self.n, self.desc = int(total), int(initial), desc
        self.every, self.file, self.clock = float(every), file, clock
        self.start_n, self.t0 = self.n, clock()
        self.last = self.t0
        self.postfix: dict = {}
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def set_postfix(self, values: dict, refresh: bool = True) -> None:
        self.postfix = dict(values)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        done = self.n - self.start_n
        rate = done / max(now - self.t0, 1e-9)
        pct = 100.0 * self.n / max(self.total, 1)
        parts = [f"{self.desc}: iteration {self.n}/{self.total} ({pct:.1f} %)"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(f"{rate:.2f} it/s")
        if done and self.n < self.total:
            parts.append(f"ETA {_hms((self.total - self.n) / rate)}")
        return ", ".join(parts)

    def _print(self, now: float) -> None:
        self.printed_n = self.n
        print(self.line(now), file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        """A last line, unless the latest one already shows where it stopped."""
        if not self.closed:
            self.closed = True
            if self.n > getattr(self, "printed_n", self.start_n):
                self._print(self.clock())


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values: dict, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str, total: int, initial: int = 0, desc: str = "",
                  enabled: bool = True, every: float = 30.0):
    """A progress reporter for `mode` (bar, lines, none; auto resolved here)."""
    mode = resolve_mode(mode)
    if not enabled or mode == "none":
        return _Silent()
    if mode == "lines":
        return LineProgress(total, initial, desc, every)
    return tqdm(total=total, initial=initial, dynamic_ncols=True, desc=desc)
