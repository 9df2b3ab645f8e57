"""The ``pyro-monteclora`` command line: :func:`main` is the console script's entry point.

Example:
    >>> from pyro_monteclora.cli import build_parser
    >>> build_parser().parse_args(["inspect", "--adapter-path", "out"]).command
    'inspect'
"""

from .entry import main
from .inputs import DATA_EXTENSIONS, load_data_arg
from .parser import CHOICES, FLAG_NAMES, NOT_FLAGS, build_parser, config_overrides

_config_overrides = config_overrides  # its name before the parser had a module of its own

__all__ = ["main", "build_parser", "config_overrides", "load_data_arg", "DATA_EXTENSIONS", "CHOICES", "FLAG_NAMES",
           "NOT_FLAGS"]
