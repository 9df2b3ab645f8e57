"""Training by SVI on transformers' Trainer. ``pyro_monteclora.train(model, dataset, config=None, **overrides)``.

- :mod:`.elbo`: the objective (negative ELBO + cooperative loss) as an ``nn.Module``;
- :mod:`.draw`: the adapter drawn for a step, held until its backward pass has run;
- :mod:`.trainer`: :class:`MonteCLoRATrainerMixin` / :class:`MonteCLoRATrainer`;
- :mod:`.distributed`: the accelerate setups the Trainer runs under (one process, DDP) and the refusals;
- :mod:`.batches`: the examples and collator the Trainer iterates;
- :mod:`.api`: :func:`train`, a thin layer over the Trainer;
- :mod:`.bayesianize`: :func:`bayesianize`, a MonteCLoRA posterior fitted around a trained peft LoRA.

The subpackage and the function share a name; this module is itself callable (it calls
:func:`pyro_monteclora.train.api.train`), so ``pyro_monteclora.train(model, dataset)`` works
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

from .api import TrainResult, evaluate_mean, train
from .divergence import TrainingDiverged
from .elbo import ELBOLoss, LossTerms, cooperative_loss
from .trainer import MonteCLoRATrainer, MonteCLoRATrainerMixin

__all__ = [
    "train",
    "TrainResult",
    "ELBOLoss",
    "LossTerms",
    "cooperative_loss",
    "evaluate_mean",
    "MonteCLoRATrainer",
    "MonteCLoRATrainerMixin",
    "TrainingDiverged",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return train(*args, **kwargs)


_CallableModule.__call__.__doc__ = train.__doc__
sys.modules[__name__].__class__ = _CallableModule
