"""Applying a trained model to video: ``python -m sfc.predict`` / ``sfc-predict``.

* :mod:`.stream`  ``StreamingAccel``: Accel frame by frame, the reference branch on every K-th
                  frame, its 1/4-resolution logits carried forward by the FlowNet's flow
* :mod:`.frames`  reading a folder of images or a video file (OpenCV), with clear errors
* :mod:`.cli`     the command line and its outputs (colour, labelIds, overlay, MP4, JSON)

Imports models, data, evaluation (to identify checkpoints) and vis; nothing imports it.
"""

from sfc.predict.stream import StreamingAccel

__all__ = ["StreamingAccel"]
