"""``python -m sfc.train``: see :mod:`sfc.train.cli`."""

import sys

from sfc.train.cli import main

sys.exit(main())
