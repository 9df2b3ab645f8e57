"""Choose the posterior's noise scale after training, on a validation split.

MonteCLoRA's adapter is ``A~ = A + eps * sum_k pi_k z_k``: the noise scale ``eps``
(``sample_scaler``) sets how far the posterior's draws reach around the mean adapter ``A``
(``E[A~] = A`` for every ``eps``). Training fixes ``eps`` (the paper: 5e-3), and the ELBO
would not widen it if it were learned: ``eps`` enters no KL term, only the expected
log-likelihood of the training data, which around a trained mean adapter falls as the noise
grows. :func:`tune_posterior_scale` multiplies ``eps`` by the factor that suits a
held-out split, in the spirit of training-free Bayesianization (TFB):

- ``rule="nll"``: the factor whose posterior predictive has the lowest validation NLL;
- ``rule="tolerance"``: the largest factor whose validation NLL exceeds the mean adapter's by
  at most ``tolerance`` nats per example (TFB's rule: as wide as the data allow).

Only ``eps`` changes: the Wishart and Dirichlet posteriors, the mixture of N Gaussian
components per column and ``E[A~] = A`` stay as trained, and the covariance of each column's
noise scales by ``factor**2``. The chosen scale is written into ``monteclora.monteclora_config``,
so :func:`pyro_monteclora.save_pretrained` / :func:`pyro_monteclora.load` keep it. Every
factor is scored with the same seeded draws (common random numbers), so the curve is smooth.

In the ``"learned"`` variant the ELBO set a width per column instead of one ``eps``; the factor
multiplies every learned width (their ratios stay the ELBO's), and the chosen widths are the
guide's, saved with it. There the curve is the validation NLL against the learned width:
factor 1 is what the ELBO chose.

Example:
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert, toy_sentiment, toy_tokenizer
    >>> mc = MonteCLoRA.from_model(tiny_bert(vocab_size=16), lora_r=4)
    >>> choice = tune_posterior_scale(mc, toy_sentiment(8), factors=(1, 4), num_samples=2,
    ...                               tokenizer=toy_tokenizer())
    >>> choice.factor in (1, 4), mc.monteclora_config.sample_scaler == choice.sample_scaler
    (True, True)
    >>> choose_factor([1, 2, 4], [0.50, 0.45, 0.47], mean_nll=0.48, rule="tolerance", tolerance=0.0)
    4
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..calibration import calibration_metrics
from .evaluation import predictive_outputs
from ..quiet import quiet

__all__ = ["tune_posterior_scale", "choose_factor", "ScaleChoice", "RULES", "set_sample_scaler"]

RULES = ("nll", "tolerance")


@dataclass
class ScaleChoice:
    """What :func:`tune_posterior_scale` measured and chose.

    Attributes:
        factor: the chosen multiplier of the trained ``eps`` (of the learned widths in the
            ``"learned"`` variant).
        sample_scaler: the new ``eps`` (trained ``eps`` x ``factor``), now the model's; in the
            ``"learned"`` variant the unchanged ``eps`` (the widths carry the factor).
        trained_sample_scaler: ``eps`` before tuning.
        factors: the multipliers tried, in order.
        nll: validation NLL (per example) of the posterior predictive at each factor.
        ece: validation ECE (15 bins) at each factor.
        mean_nll: validation NLL of the mean adapter (no noise).
        rule: the rule that chose ``factor``.
    """

    factor: float
    sample_scaler: float
    trained_sample_scaler: float
    factors: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    ece: list[float] = field(default_factory=list)
    mean_nll: float = math.nan
    rule: str = "nll"


def choose_factor(
    factors: Sequence[float], nlls: Sequence[float], mean_nll: float, rule: str = "nll", tolerance: float = 0.01
) -> float:
    """The factor a rule picks from the validation NLLs (see the module docstring).

    With ``rule="tolerance"`` and no factor within the tolerance, the smallest factor is kept.

    Example:
        >>> choose_factor([1, 2, 4], [0.50, 0.45, 0.47], mean_nll=0.48)
        2
        >>> choose_factor([1, 2, 4], [0.50, 0.52, 0.60], mean_nll=0.48, rule="tolerance", tolerance=0.01)
        1
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if len(factors) != len(nlls) or not factors:
        raise ValueError(f"need one NLL per factor, got {len(factors)} factors and {len(nlls)} NLLs")
    if rule == "nll":
        return factors[min(range(len(factors)), key=lambda i: (nlls[i], factors[i]))]
    within = [f for f, nll in zip(factors, nlls) if nll <= mean_nll + tolerance]
    return max(within) if within else min(factors)


def set_sample_scaler(monteclora: Any, sample_scaler: float) -> None:
    """Make ``sample_scaler`` the model's ``eps``: the noise map's and the saved config's."""
    monteclora.monteclora_config = monteclora.monteclora_config.replace(sample_scaler=float(sample_scaler))
    monteclora.model.sample_scaler = float(sample_scaler)


def tune_posterior_scale(
    monteclora: Any,
    validation_data: Any,
    factors: Union[str, Sequence[float]] = "auto",
    num_samples: int = 8,
    rule: str = "nll",
    tolerance: float = 0.01,
    seed: Optional[int] = 0,
    tokenizer: Any = None,
    batch_size: int = 32,
    max_factor: float = 256.0,
) -> ScaleChoice:
    """Set ``monteclora``'s ``eps`` to the trained one times the factor ``rule`` picks on ``validation_data``
    (in the ``"learned"`` variant: every learned column width times that factor).

    Args:
        monteclora: a trained :class:`~pyro_monteclora.MonteCLoRA` (changed in place).
        validation_data: held-out ``text``/``label`` rows (classifier) or multiple-choice
            instruction rows (causal LM), in any form :func:`pyro_monteclora.evaluate` takes.
        factors: positive multipliers of the trained ``eps`` (or widths) to try, or ``"auto"``: a
            geometric search from 1 that doubles (or halves) while the validation NLL falls,
            then tries the best factor times ``2**(+-1/2)`` (about 6 to 9 evaluations; with
            ``rule="tolerance"`` it doubles while the NLL stays within the tolerance).
        num_samples: posterior draws per validation prediction.
        rule: ``"nll"`` or ``"tolerance"`` (see the module docstring).
        tolerance: for ``rule="tolerance"``, the allowed rise of the validation NLL over the
            mean adapter's, in nats per example.
        seed: seed of the draws (the same draws for every factor).
        max_factor: the largest factor (and ``1 / max_factor`` the smallest) ``"auto"`` tries.

    Returns a :class:`ScaleChoice` with the whole validation curve (factors in the order tried).
    """
    automatic = isinstance(factors, str)
    if automatic and factors != "auto":
        raise ValueError(f"factors must be 'auto' or a list of positive numbers, got {factors!r}")
    if not automatic and (not factors or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in factors)):
        raise ValueError(f"factors must be positive numbers, got {list(factors)!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative number of nats, got {tolerance!r}")
    trained = float(monteclora.monteclora_config.sample_scaler)
    scale = _scaler(monteclora)
    tried: dict[float, tuple[float, float]] = {}

    def score(factor: float) -> float:
        if factor not in tried:
            scale(factor)
            out = predictive_outputs(monteclora, validation_data, num_samples, "sample", batch_size, seed, tokenizer)
            metrics = calibration_metrics(out["probs"], out["labels"])
            tried[factor] = (float(metrics["nll"]), float(metrics["ece"]))
        return tried[factor][0]

    with quiet():
        mean = predictive_outputs(monteclora, validation_data, 0, "mean", batch_size, seed, tokenizer)
        mean_nll = float(calibration_metrics(mean["probs"], mean["labels"])["nll"])
        try:
            if automatic:
                _search(score, rule, mean_nll + tolerance, max_factor)
            else:
                for factor in factors:
                    score(float(factor))
        finally:
            scale(1.0)
    order = list(tried)
    factor = choose_factor(order, [tried[f][0] for f in order], mean_nll, rule, tolerance)
    scale(factor)
    return ScaleChoice(
        factor=factor, sample_scaler=float(monteclora.monteclora_config.sample_scaler), trained_sample_scaler=trained,
        factors=order,
        nll=[tried[f][0] for f in order], ece=[tried[f][1] for f in order], mean_nll=mean_nll, rule=rule,
    )


def _scaler(monteclora: Any) -> Callable[[float], None]:
    """``scale(factor)``: the trained noise scale times ``factor`` (``scale(1.0)`` restores it).

    The paper variant's ``eps``, or every learned column width (the guide's ``log_width`` plus ``log factor``).
    """
    if monteclora.monteclora_config.variant == "paper":
        trained = float(monteclora.monteclora_config.sample_scaler)
        return lambda factor: set_sample_scaler(monteclora, trained * factor)
    log_widths = [p.log_width for p in monteclora.guide.posteriors.values()]
    trained_logs = [w.detach().clone() for w in log_widths]

    def scale(factor: float) -> None:
        with torch.no_grad():
            for log_width, log_trained in zip(log_widths, trained_logs):
                log_width.copy_(log_trained + math.log(factor))

    return scale


def _search(score: Any, rule: str, limit: float, max_factor: float) -> None:
    """Geometric search of the factor (see :func:`tune_posterior_scale`); ``score`` records every trial."""
    low, high = 1.0 / max_factor, max_factor
    best = 1.0
    if rule == "nll":
        for step in (2.0, 0.5):  # double while the NLL falls; if doubling never helped, halve
            moved = False
            while low <= best * step <= high and score(best * step) < score(best):
                best, moved = best * step, True
            if moved:
                break
    elif score(best) <= limit:  # widest within the tolerance: double while within
        while best * 2 <= high and score(best * 2) <= limit:
            best *= 2
    else:  # not even the trained scale is within: halve until it is
        while best / 2 >= low and score(best) > limit:
            best /= 2
    for factor in (best * 2 ** 0.5, best * 2 ** -0.5):
        if low <= factor <= high:
            score(factor)
