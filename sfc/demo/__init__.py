"""The demo: the whole SFC pipeline on synthetic video domains, minutes on a CPU.

* :mod:`.runner`   ``python -m sfc.demo`` / ``sfc-demo`` (what ``make demo`` runs): data, the
                   seven ``exp/`` scripts, evaluation, summary, gallery
* :mod:`.report`   the summary table and JSON
* :mod:`.gallery`  the picture gallery of target-val frames
* :mod:`.gap`      ``python -m sfc.demo.gap``: measures the synthetic domain gap (docs/data.md)

Nothing else in the package imports the demo.
"""

from sfc.demo import runner
from sfc.demo.runner import CONFIGS, HINT, STAGES, DemoError, check_config, main, stage_args

__all__ = ["CONFIGS", "HINT", "STAGES", "DemoError", "check_config", "main", "runner", "stage_args"]
