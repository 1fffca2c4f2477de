"""The streaming Accel lives in :mod:`sfc.models.streaming` (evaluation uses it too)."""

from sfc.models.streaming import StreamingAccel

__all__ = ["StreamingAccel"]
