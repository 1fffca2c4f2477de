"""Training: one engine for the seven runs of the SFC pipeline (method §5).

* :mod:`.cli`          ``python -m sfc.train`` / ``sfc-train``: flags, defaults, datasets
* :mod:`.engine`       the one loop: streams, LR, step, evaluation, checkpoints, resume, signals
* :mod:`.stages`       the three stage kinds (segnet / accel / sfm): networks, inits, loss, LR
* :mod:`.guard`        the finiteness checks, read at once or deferred on the device
* :mod:`.graphed`      --cuda-graph: the whole iteration captured as one CUDA graph
* :mod:`.optim`        the release-exact repeated-parameter SGD, the SFM's Adam, LR rules
* :mod:`.streams`      endless, resumable, seeded data streams; uint8 clips normalised on device
* :mod:`.inputs`       reading earlier runs (and the release's files) into fresh networks
* :mod:`.runio`        run directory I/O: atomic checkpoints, config, logs, RNG state
* :mod:`.tb_pictures`  the TensorBoard pictures drawn at each evaluation
"""

from sfc.train.cli import build_data, build_parser, main, resolve
from sfc.train.engine import Trainer, train

__all__ = ["Trainer", "build_data", "build_parser", "main", "resolve", "train"]
