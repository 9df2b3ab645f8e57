"""The MonteCLoRA Pyro model: priors, noise map, likelihoods and the model itself."""

from .column_prior import column_prior_kl, column_prior_scale
from .likelihood import IGNORE_INDEX, OBSERVATION_SITE, causal_lm_likelihood, classification_likelihood
from .model import MonteCLoRAModel
from .noise import adapter_noise
from .prior import GroupPrior, site_names
from .width import width_kl

__all__ = [
    "MonteCLoRAModel",
    "GroupPrior",
    "adapter_noise",
    "column_prior_kl",
    "column_prior_scale",
    "width_kl",
    "site_names",
    "classification_likelihood",
    "causal_lm_likelihood",
    "IGNORE_INDEX",
    "OBSERVATION_SITE",
]
