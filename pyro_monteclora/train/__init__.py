"""Training by SVI. ``pyro_monteclora.train(model, dataset, config=None, **overrides)`` fine-tunes.

The subpackage and the function share a name; this module is itself callable (it calls
:func:`pyro_monteclora.train.loop.train`), so ``pyro_monteclora.train(model, dataset)`` works
whether ``pyro_monteclora.train`` was imported as a module or not, while
``pyro_monteclora.train.ELBOLoss`` and friends stay reachable.

Example:
    >>> import pyro_monteclora.train
    >>> import pyro_monteclora
    >>> callable(pyro_monteclora.train) and pyro_monteclora.train.ELBOLoss is not None
    True
"""

import sys
import types

from .elbo import ELBOLoss, LossTerms, cooperative_loss
from .loop import TrainResult, evaluate_mean, train

__all__ = ["train", "TrainResult", "ELBOLoss", "LossTerms", "cooperative_loss", "evaluate_mean"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


_CallableModule.__call__.__doc__ = train.__doc__
sys.modules[__name__].__class__ = _CallableModule
