"""Evaluation (method §6): ``python -m sfc.evaluate`` and the loops used in training.

* :mod:`.metrics`    confusion matrix, IoU / mIoU, table / JSON / CSV
* :mod:`.core`       ``evaluate_segnet``, ``evaluate_accel``, ``evaluate_sfm``
* :mod:`.data`       ``NativeLabels`` (the ``full`` protocol), ``make_eval_loader`` (sharded)
* :mod:`.checkpoint` identifying and building the network a checkpoint holds
* :mod:`.cli`        the command line (``python -m sfc.evaluate``, ``sfc-evaluate``)

Imports models, data, checkpoints and dist only — never the training package.
"""

from sfc.evaluate.cli import build_parser, main, run
from sfc.evaluate.core import PROTOCOLS, evaluate_accel, evaluate_segnet, evaluate_sfm
from sfc.evaluate.data import NativeLabels, make_eval_loader

__all__ = ["PROTOCOLS", "NativeLabels", "build_parser", "evaluate_accel", "evaluate_segnet",
           "evaluate_sfm", "main", "make_eval_loader", "run"]
