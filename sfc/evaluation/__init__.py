"""Evaluation (SPEC §6): the loops used in training and by ``python -m sfc.evaluate``.

* :mod:`.core`       ``evaluate_segnet``, ``evaluate_accel``, ``evaluate_sfm``
* :mod:`.data`       ``NativeLabels`` (the ``full`` protocol), ``make_eval_loader`` (sharded)
* :mod:`.checkpoint` identifying and building the network a checkpoint holds
* :mod:`.cli`        the command line
"""

from sfc.evaluation.core import PROTOCOLS, evaluate_accel, evaluate_segnet, evaluate_sfm
from sfc.evaluation.data import NativeLabels, make_eval_loader

__all__ = ["PROTOCOLS", "NativeLabels", "evaluate_accel", "evaluate_segnet", "evaluate_sfm",
           "make_eval_loader"]
