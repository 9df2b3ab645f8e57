"""The module paths of release 0.1.0, kept importable for one release after the move to subpackages.

``import pyro_monteclora.predictive`` (or ``io_load``, ``cli_parser``, ...) gives the module's new
home itself, so names (private ones included) and monkeypatching behave as before; a
``DeprecationWarning`` names the new path. See CHANGELOG.md.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     import pyro_monteclora.scoring as old
    >>> old.__name__
    'pyro_monteclora.prediction.scoring'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Optional, Sequence

__all__ = ["MOVED", "KEPT", "install"]

#: Old module (under ``pyro_monteclora.``) -> its home since 0.2.
MOVED = {
    "bayesianize": "train.bayesianize",
    "train.data": "train.batches",
    "predictive": "prediction.predictive",  # also an attribute of the package, as before
    "scoring": "prediction.scoring",
    "evaluation": "prediction.evaluation",
    "uncertainty": "prediction.uncertainty",
    "posterior_scale": "prediction.posterior_scale",
    "generation": "prediction.generation",
    "io_format": "io.format",
    "io_atomic": "io.atomic",
    "io_save": "io.save",
    "io_load": "io.read",
    "model_card": "io.model_card",
    "merge": "export.merge",
    "kohya": "export.kohya",
    "data_files": "data.files",
    "cli_parser": "cli.parser",
    "cli_commands": "cli.commands",
    "cli_inputs": "cli.inputs",
}

#: Old paths that stay documented (``pyro_monteclora.predictive`` and ``.evaluation`` are in
#: ``pyro_monteclora.__all__``): aliases without a warning.
KEPT = frozenset({"predictive", "evaluation"})


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        if spec.name.split(".", 1)[1] not in KEPT:
            warnings.warn(f"{spec.name} moved to {self.target}; the old path goes in the next release",
                          DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module is already executed


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        prefix = __package__ + "."
        new = MOVED.get(fullname[len(prefix):]) if fullname.startswith(prefix) else None
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(prefix + new))


def install() -> None:
    """Put the finder of the old paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
