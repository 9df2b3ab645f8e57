r"""pyro_monteclora: MonteCLoRA (Bayesian LoRA) as an explicit Pyro model, guide and SVI loop.

Example:
    >>> import torch
    >>> import pyro_monteclora
    >>> from pyro_monteclora.testing import tiny_bert, toy_sentiment, toy_tokenizer
    >>> tokenizer = toy_tokenizer(["the", "is", "good", "bad"])
    >>> result = pyro_monteclora.train(tiny_bert(vocab_size=8), toy_sentiment(16), tokenizer=tokenizer,
    ...                                num_epochs=1, batch_size=8, lora_r=4, progress=False)
    >>> sorted(result.history[-1])
    ['cooperative', 'epoch', 'kl', 'loss', 'lr', 'nll', 'step']
    >>> out = pyro_monteclora.Predictive(result.model, num_samples=4, seed=0)({"input_ids": torch.tensor([[2, 6, 3]])})
    >>> round(float(out["probs"].sum()), 5)
    1.0
"""

from . import _legacy, calibration, distributions, inspection, train
from ._version import __version__
from .calibration import calibration_metrics, reliability_diagram
from .config import MonteCLoRAConfig
from .inspection import format_summary, render_model, render_model_text, summary
from .io import OutputLocked, save_pretrained, save_result
from .monteclora import MonteCLoRA, load
from .prediction import evaluation, predictive
from .prediction.evaluation import evaluate
from .prediction.posterior_scale import tune_posterior_scale
from .prediction.predictive import Predictive, predict
from .prediction.scoring import multiple_choice, sequence_log_likelihood
from .prediction.uncertainty import ood_scores, selective_prediction
from .train import MonteCLoRATrainer, MonteCLoRATrainerMixin, TrainingDiverged, TrainResult
from .train.bayesianize import bayesianize

_legacy.install()

__all__ = [
    "MonteCLoRAConfig",
    "MonteCLoRA",
    "TrainResult",
    "train",
    "MonteCLoRATrainer",
    "MonteCLoRATrainerMixin",
    "TrainingDiverged",
    "load",
    "save_pretrained",
    "save_result",
    "OutputLocked",
    "Predictive",
    "predict",
    "sequence_log_likelihood",
    "multiple_choice",
    "evaluate",
    "ood_scores",
    "selective_prediction",
    "bayesianize",
    "tune_posterior_scale",
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
