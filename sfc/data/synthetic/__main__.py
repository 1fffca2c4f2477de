"""``python -m sfc.data.synthetic``: see :mod:`sfc.data.synthetic.writer`."""

from sfc.data.synthetic.writer import main

main()
