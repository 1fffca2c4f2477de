"""A process-wide choice between implementations of one computation (`aspp_gemm`, `dilated`)."""

from __future__ import annotations

from contextlib import contextmanager


class ImplSwitch:
    """`mode` is one of `modes`; `set` checks it, `context` sets it for a block and restores."""

    def __init__(self, what: str, modes: tuple[str, ...], default: str):
        self.what, self.modes, self.mode = what, tuple(modes), default

    def set(self, mode: str) -> None:
        if mode not in self.modes:
            raise ValueError(f"{self.what} must be one of {self.modes}, got {mode!r}")
        self.mode = mode

    def get(self) -> str:
        return self.mode

    @contextmanager
    def context(self, mode: str):
        old = self.mode
        self.set(mode)
        try:
            yield
        finally:
            self.mode = old
