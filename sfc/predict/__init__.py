"""Applying a trained model to video: ``python -m sfc.predict`` / ``sfc-predict``.

* :mod:`.stream`  ``StreamingAccel`` (from :mod:`sfc.models.streaming`): Accel frame by frame
                  as trained — keyframes the reference branch alone, frames after them its
                  flow-propagated logits fused with the update branch
* :mod:`.frames`  reading a folder of images or a video file (OpenCV), with clear errors
* :mod:`.cli`     the command line and its outputs (colour, labelIds, overlay, MP4, JSON)

Imports models, data, evaluation (to identify checkpoints) and vis; nothing imports it.
"""

from sfc.predict.stream import StreamingAccel

__all__ = ["StreamingAccel"]
