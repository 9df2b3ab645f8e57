"""Prediction with the posterior: draws and their predictive, scores of texts and choices, metrics.

- :mod:`.predictive`: :class:`Predictive` and :func:`predict` (classification and causal LMs);
- :mod:`.scoring`: log-likelihoods of continuations and multiple-choice answers;
- :mod:`.evaluation`: :func:`evaluate` (accuracy, NLL, Brier, ECE, AURC of the mean and the predictive);
- :mod:`.uncertainty`: selective prediction and out-of-distribution detection;
- :mod:`.posterior_scale`: the validation-chosen width of the posterior;
- :mod:`.generation`: greedy answers with extraction.

Example:
    >>> from pyro_monteclora.prediction import Predictive, evaluate, predict
    >>> callable(evaluate) and callable(predict)
    True
"""

from .evaluation import evaluate
from .generation import extract_answer, generate_answers
from .posterior_scale import ScaleChoice, tune_posterior_scale
from .predictive import Predictive, draw_latents, predict, predictive_summary
from .scoring import multiple_choice, sequence_log_likelihood
from .uncertainty import ood_scores, selective_prediction

__all__ = [
    "Predictive",
    "predict",
    "predictive_summary",
    "draw_latents",
    "sequence_log_likelihood",
    "multiple_choice",
    "evaluate",
    "selective_prediction",
    "ood_scores",
    "tune_posterior_scale",
    "ScaleChoice",
    "generate_answers",
    "extract_answer",
]
