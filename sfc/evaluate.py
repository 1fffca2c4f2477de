"""``python -m sfc.evaluate`` and the confusion-matrix evaluation used in training (SPEC §6).

The code lives in :mod:`sfc.evaluation`; this module is its public face::

    from sfc.evaluate import evaluate_accel, evaluate_segnet, evaluate_sfm
    python -m sfc.evaluate --checkpoint CKPT --data DATA_ROOT [--protocol release|full] ...
"""

import sys

from sfc.evaluation import (
    PROTOCOLS,
    NativeLabels,
    evaluate_accel,
    evaluate_segnet,
    evaluate_sfm,
    make_eval_loader,
)
from sfc.evaluation.cli import build_parser, main, run

__all__ = ["PROTOCOLS", "NativeLabels", "build_parser", "evaluate_accel", "evaluate_segnet",
           "evaluate_sfm", "main", "make_eval_loader", "run"]

if __name__ == "__main__":
    sys.exit(main())
