"""Plain nn.Modules of SFC (method §3): DeepLab-v2 SegNet, thin FlowNetS (also the SFM), warp,
Accel, and Accel run frame by frame as trained (``StreamingAccel``). Nothing here reads files
or needs a GPU at construction."""

from .accel import Accel
from .deeplab import DeepLabV2
from .flownet import FlowNetS
from .streaming import StreamingAccel
from .warp import warp

__all__ = ["Accel", "DeepLabV2", "FlowNetS", "StreamingAccel", "warp"]
