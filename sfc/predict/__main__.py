"""``python -m sfc.predict``: see :mod:`sfc.predict.cli`."""

import sys

from sfc.predict.cli import main

sys.exit(main())
