"""How the KL term is weighted from step to step: constant (the ELBO) or BLoB's reweighting.

The per-step loss of :class:`~pyro_monteclora.train.trainer.MonteCLoRATrainer` is an unbiased
estimate of the negative ELBO per training example: ``nll_batch / n + kl_weight * KL / D``. Over
an epoch of ``M`` steps the KL is counted ``M`` times, each time ``1/M`` of what the data term
counts over the epoch, which is the ELBO.

``"blob"`` is the minibatch reweighting of Blundell et al. (2015, eq. 9) that BLoB (Wang et al.,
2024) uses: step ``i = 1..M`` of an epoch weighs the KL by ``pi_i = 2**i / (2**(M + 1) - 1)``
instead of ``1/M``, so early steps fit the data almost without the prior and the late steps
carry most of it; an epoch's weights still sum to about 1 (``1 - 1/(2**(M + 1) - 1)``), so each
epoch's total is the ELBO's. In the per-example loss here that is the factor ``M * pi_i`` on
``kl_weight``.

Example:
    >>> [round(kl_factor("blob", step, steps_per_epoch=3), 3) for step in range(1, 7)]
    [0.4, 0.8, 1.6, 0.4, 0.8, 1.6]
    >>> kl_factor("constant", 5, steps_per_epoch=3)
    1.0
"""

from __future__ import annotations

import math

from ..config import KL_SCHEDULES

__all__ = ["KL_SCHEDULES", "kl_factor"]


def kl_factor(schedule: str, step: int, steps_per_epoch: int) -> float:
    """The factor on ``kl_weight`` at optimizer step ``step`` (1-based, counted over the whole run).

    ``"constant"``: 1. ``"blob"``: ``M * 2**i / (2**(M + 1) - 1)`` with ``i`` the step's place in its
    epoch (1..M) and ``M = steps_per_epoch``; computed as ``M * 2**(i - M - 1) / (1 - 2**-(M + 1))``,
    which neither overflows for long epochs nor loses the late steps' weights.
    """
    if schedule == "constant":
        return 1.0
    if schedule != "blob":
        raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES}, got {schedule!r}")
    if steps_per_epoch < 1 or step < 1:
        raise ValueError(f"step and steps_per_epoch must be positive, got {step} and {steps_per_epoch}")
    m = steps_per_epoch
    i = (step - 1) % m + 1
    return m * math.ldexp(1.0, i - m - 1) / (1.0 - math.ldexp(1.0, -(m + 1)))
