"""``python -m sfc.evaluate``: see :mod:`sfc.evaluate.cli`."""

import sys

from sfc.evaluate.cli import main

sys.exit(main())
