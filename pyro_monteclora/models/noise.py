"""The deterministic map from a layer group's latent variables to the noise added to A.

``noise = eps * (sum_k pi_k z_k)^T`` with ``z_k = L xi_k`` (non-centered Gaussian components,
``L`` the Cholesky factor of the covariance). With ``collapsed`` components, a single ``xi`` per
column is scaled by ``||pi||_2``: given ``pi`` and ``L`` both are ``N(0, ||pi||^2 Sigma)`` per
column, so the law of the adapter is the same.

Example:
    >>> import torch
    >>> tril = torch.eye(2).expand(3, 2, 2)            # 3 layers, r = 2
    >>> weights = torch.full((3, 4), 0.25)              # N = 4 components
    >>> components = torch.randn(3, 4, 5, 2)            # d = 5 columns
    >>> adapter_noise(tril, weights, components, scaler=1e-2).shape
    torch.Size([3, 2, 5])
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["adapter_noise"]


def adapter_noise(
    covariance_tril: torch.Tensor,
    weights: torch.Tensor,
    components: torch.Tensor,
    scaler: Union[float, torch.Tensor],
    collapsed: bool = False,
) -> torch.Tensor:
    """Noise ``(..., layers, r, d)`` for ``A`` from one group's latents.

    Args:
        covariance_tril: ``(..., layers, r, r)`` Cholesky factors of the covariances.
        weights: ``(..., layers, N)`` mixture weights on the simplex.
        components: ``(..., layers, N, d, r)`` standard normal draws, or ``(..., layers, d, r)``
            when ``collapsed``.
        scaler: epsilon, or a tensor broadcast against the ``(..., layers, r, d)`` noise (the
            ``"learned"`` variant's column widths, ``(layers, 1, d)``).
        collapsed: whether ``components`` holds one draw per column (see module docstring).
    """
    if collapsed:
        mixed = weights.norm(dim=-1)[..., None, None] * components
    else:
        mixed = torch.einsum("...n,...ndr->...dr", weights, components)
    # rows of `mixed` are xi^T; xi^T L^T = (L xi)^T, so each row becomes one z column of A.
    return scaler * (mixed @ covariance_tril.transpose(-1, -2)).transpose(-1, -2)
