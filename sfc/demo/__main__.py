"""``python -m sfc.demo``: see :mod:`sfc.demo.runner`."""

import sys

from sfc.demo.runner import main

sys.exit(main())
