"""``python -m pyro_monteclora.cli``: the same as the ``pyro-monteclora`` command."""

import sys

from .entry import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
