"""``python -m sfc.bench``: see :mod:`sfc.bench.cli`."""

import sys

from sfc.bench.cli import main

sys.exit(main())
