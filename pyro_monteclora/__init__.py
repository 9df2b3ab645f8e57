"""pyro_monteclora: MonteCLoRA (Bayesian LoRA) as an explicit Pyro model, guide and SVI loop.

Example:
    >>> import pyro_monteclora
    >>> sorted(n for n in pyro_monteclora.__all__ if n[0].isupper())[:3]
    ['MonteCLoRA', 'MonteCLoRAConfig', 'TrainResult']
"""

from . import calibration, distributions, evaluation, inspection, predictive, train
from .calibration import calibration_metrics, reliability_diagram
from .config import MonteCLoRAConfig
from .evaluation import evaluate
from .inspection import format_summary, render_model, render_model_text, summary
from .io import load, save_pretrained, save_result
from .monteclora import MonteCLoRA
from .predictive import Predictive, multiple_choice, predict, sequence_log_likelihood
from .train import TrainResult

__version__ = "0.1.0"

__all__ = [
    "MonteCLoRAConfig",
    "MonteCLoRA",
    "TrainResult",
    "train",
    "load",
    "save_pretrained",
    "save_result",
    "Predictive",
    "predict",
    "sequence_log_likelihood",
    "multiple_choice",
    "evaluate",
    "calibration_metrics",
    "reliability_diagram",
    "render_model",
    "render_model_text",
    "summary",
    "format_summary",
    "calibration",
    "distributions",
    "evaluation",
    "inspection",
    "predictive",
    "__version__",
]
