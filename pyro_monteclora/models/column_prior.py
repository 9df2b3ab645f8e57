"""The optional prior on the columns of ``A~`` whose scale is learned (empirical Bayes), and its KL.

MonteCLoRA's noise leaves ``E[A~] = A`` and, given a layer's covariance ``Sigma`` and mixture
weights ``pi``, gives each column ``j`` of ``A~`` (``r`` numbers; ``d`` columns per layer) the law

    A~_j | Sigma, pi  ~  N(A_j, C),   C = eps^2 ||pi||^2 Sigma

(``sum_k pi_k z_k`` with ``z_k ~ N(0, Sigma)`` independent; the collapsed form ``||pi|| z`` has
the same law). In the paper A is a point estimate, so nothing in the ELBO pays for width: the KL
covers only ``Sigma`` and ``pi``. With ``MonteCLoRAConfig(column_prior=True)`` the model also
gives every column the prior ``N(0, s^2 I_r)``, one scale ``s`` per layer, and the guide above
becomes the variational law of ``A~``. The ELBO then has one more KL per layer,

    sum_j KL(N(A_j, C) || N(0, s^2 I)) = 1/2 [(d tr C + ||A||_F^2) / s^2 - d r + d r log s^2 - d log det C],

and ``s`` is set to the value that maximizes the ELBO (type-II maximum likelihood, in closed
form): ``s^2 = (d tr C + ||A||_F^2) / (d r)``, at which the KL becomes

    KL = d/2 (r log s^2 - log det C).

It shrinks as the posterior widens relative to the columns' own size (for ``C = c I``, ``d r / 2 *
log(1 + ||A||_F^2 / (d r c))``), so the ELBO itself now rewards width, which only the likelihood
limits. It is evaluated at the step's draw of ``(Sigma, pi)``: a one-draw estimate of its
expectation under the guide, like the likelihood term. :class:`~pyro_monteclora.train.ELBOLoss`
adds it in closed form; the Pyro model has no sample site for ``A~`` (its Gaussian law given
``(Sigma, pi)`` is integrated analytically), so Pyro's own ELBO classes do not include it.

Measured (``docs/uncertainty.md``): the ELBO satisfies this prior mostly by shrinking A (B grows
to keep ``BA``) rather than by widening the guide, which regularizes the adapter towards zero.

Example:
    >>> import torch
    >>> a = torch.randn(2, 3, 5)                      # 2 layers, r = 3, d = 5
    >>> tril = torch.eye(3).expand(2, 3, 3)
    >>> weights = torch.full((2, 4), 0.25)
    >>> column_prior_kl(a, tril, weights, scaler=0.1).shape
    torch.Size([2])
"""

from __future__ import annotations

import torch

__all__ = ["column_prior_kl", "column_prior_scale"]


def _covariance_parts(
    covariance_tril: torch.Tensor, weights: torch.Tensor, scaler: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tr C, log det C)`` per layer for ``C = eps^2 ||pi||^2 L L^T``."""
    factor = scaler**2 * (weights**2).sum(-1)
    r = covariance_tril.shape[-1]
    trace = factor * (covariance_tril**2).sum((-1, -2))
    log_det = r * factor.log() + 2 * covariance_tril.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    return trace, log_det


def _variance(a: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    r, d = a.shape[-2], a.shape[-1]
    return (d * trace + (a**2).sum((-1, -2))) / (d * r)


def column_prior_scale(
    a: torch.Tensor, covariance_tril: torch.Tensor, weights: torch.Tensor, scaler: float
) -> torch.Tensor:
    """The prior variance ``s^2`` per layer that maximizes the ELBO: ``(d tr C + ||A||_F^2) / (d r)``.

    Args and shapes as in :func:`column_prior_kl`.
    """
    return _variance(a, _covariance_parts(covariance_tril, weights, scaler)[0])


def column_prior_kl(
    a: torch.Tensor, covariance_tril: torch.Tensor, weights: torch.Tensor, scaler: float
) -> torch.Tensor:
    """``sum_j KL(N(A_j, C) || N(0, s^2 I))`` per layer at the ELBO-optimal ``s`` (module docstring).

    Args:
        a: ``(..., layers, r, d)``: the layers' mean factors A.
        covariance_tril: ``(..., layers, r, r)``: Cholesky factors of the drawn covariances.
        weights: ``(..., layers, N)``: the drawn mixture weights.
        scaler: epsilon.

    Returns:
        ``(..., layers)`` KLs in nats (non-negative).
    """
    r, d = a.shape[-2], a.shape[-1]
    trace, log_det = _covariance_parts(covariance_tril, weights, scaler)
    return 0.5 * d * (r * _variance(a.to(covariance_tril.dtype), trace).log() - log_det)
