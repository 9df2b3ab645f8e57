"""The package version, in a module of its own so that lower layers (io) can record it.

Example:
    >>> from pyro_monteclora._version import __version__
    >>> __version__.count(".")
    2
"""

__version__ = "0.1.0"
