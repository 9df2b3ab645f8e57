"""``python -m benchmarks.calibration``: the protocol's command line (see :mod:`.protocol`)."""

from .protocol import main

main()
