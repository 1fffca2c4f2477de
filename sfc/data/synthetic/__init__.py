"""Synthetic video domains written in the real on-disk layouts (VIPER, Cityscapes-Seq,
SYNTHIA-Seq), for the tests and the demo.

* :mod:`.scene`   procedural street scenes with coherent motion (one ``Scene`` per video)
* :mod:`.styles`  the appearance of each domain and its class-id maps
* :mod:`.writer`  ``generate(out_dir, ...)`` and ``python -m sfc.data.synthetic``
"""

from sfc.data.synthetic.writer import DATASETS, DEFAULTS, SIZES, TINY, TINY_SIZES, generate

__all__ = ["DATASETS", "DEFAULTS", "SIZES", "TINY", "TINY_SIZES", "generate"]
