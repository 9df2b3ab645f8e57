"""The ``"learned"`` variant: a prior on ``A~`` and a posterior width per column that the ELBO learns.

In the paper's parameterization the draw ``A~ = A + eps * sum_k pi_k z_k`` sits around a point
estimate ``A`` with a fixed ``eps`` that enters no KL term, so the ELBO never decides how wide the
posterior is. With ``MonteCLoRAConfig(variant="learned")`` every element of ``A~`` gets the prior
``N(0, sigma_p^2)`` (``prior_std``, BLoB's 0.2), and the guide draws column ``j`` of a layer's
``A~`` (``r`` numbers, one column per input feature) as

    A~_j = A_j + w_j * sum_k pi_k z_k,      z_k ~ N(0, Sigma)   (Wishart Sigma, Dirichlet pi: as before)

with a positive width ``w_j`` per column (a guide parameter, started at ``sample_scaler``). Given
``(Sigma, pi)`` the column's law is ``N(A_j, w_j^2 ||pi||^2 Sigma)``, so its KL to the prior is in
closed form; summed over the ``d`` columns of a layer (``q = ||pi||^2``, ``W = sum_j w_j^2``):

    KL = 1/2 [ (q W tr Sigma + ||A||_F^2) / sigma_p^2 - d r + d r log sigma_p^2
               - r sum_j log(w_j^2 q) - d log det Sigma ].

It grows with ``||A||`` (the prior's pull on the mean) and falls as the widths grow towards what
the prior allows, so the likelihood and the prior now settle the width. The ELBO adds it at the
step's draw of ``(Sigma, pi)``, a one-draw Monte Carlo estimate of its expectation under the guide
(exact in ``A~``); ``Sigma`` and ``pi`` keep their priors and KLs, so the model is the paper's with
``A~`` made latent (an auxiliary-variable bound whose reverse model is their prior). A width per
column, rather than per element as in BLoB, keeps MonteCLoRA's structure (the noise of a column is
still the Wishart-correlated mixture) and adds ``d`` numbers per layer (BLoB: ``r d``).

Example:
    >>> import torch
    >>> a = torch.zeros(2, 3, 5)                             # 2 layers, r = 3, d = 5
    >>> tril = torch.eye(3).expand(2, 3, 3)
    >>> weights = torch.tensor([[1.0, 0.0], [1.0, 0.0]])     # ||pi|| = 1
    >>> widths = torch.full((2, 5), 0.2)                     # the prior's own scale: KL 0
    >>> width_kl(a, tril, weights, widths, prior_std=0.2).abs().max() < 1e-5
    tensor(True)
"""

from __future__ import annotations

import math

import torch

__all__ = ["width_kl"]


def width_kl(
    a: torch.Tensor, covariance_tril: torch.Tensor, weights: torch.Tensor, widths: torch.Tensor, prior_std: float
) -> torch.Tensor:
    """``sum_j KL(N(A_j, w_j^2 ||pi||^2 Sigma) || N(0, sigma_p^2 I_r))`` per layer (module docstring).

    Args:
        a: ``(..., layers, r, d)``: the layers' mean factors A.
        covariance_tril: ``(..., layers, r, r)``: Cholesky factors of the drawn covariances.
        weights: ``(..., layers, N)``: the drawn mixture weights.
        widths: ``(layers, d)``: the columns' widths ``w`` (positive).
        prior_std: ``sigma_p``.

    Returns:
        ``(..., layers)`` KLs in nats, computed in the dtype of ``covariance_tril``.
    """
    r, d = a.shape[-2], a.shape[-1]
    dtype = covariance_tril.dtype
    q = (weights.to(dtype) ** 2).sum(-1)
    trace = (covariance_tril**2).sum((-1, -2))
    log_det = 2 * covariance_tril.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    widths = widths.to(dtype)
    variance = prior_std**2
    spread = q * (widths**2).sum(-1) * trace + (a.to(dtype) ** 2).sum((-1, -2))
    log_widths = r * (2 * widths.log().sum(-1) + d * q.log())
    return 0.5 * (spread / variance - d * r + d * r * math.log(variance) - log_widths - d * log_det)
