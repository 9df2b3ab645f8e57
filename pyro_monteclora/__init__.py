"""pyro_monteclora: MonteCLoRA (Bayesian LoRA) as an explicit Pyro model, guide and SVI loop.

Example:
    >>> import pyro_monteclora
    >>> sorted(n for n in pyro_monteclora.__all__ if n[0].isupper())[:3]
    ['MonteCLoRA', 'MonteCLoRAConfig', 'TrainResult']
"""

from . import distributions, train
from .config import MonteCLoRAConfig
from .monteclora import MonteCLoRA
from .train import TrainResult

__version__ = "0.1.0"

__all__ = ["MonteCLoRAConfig", "MonteCLoRA", "TrainResult", "train", "distributions", "__version__"]
