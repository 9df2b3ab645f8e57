"""Distributions of the MonteCLoRA latents, with the KL divergences the ELBO needs.

``WishartCholesky`` is the Wishart distribution written on the Cholesky factor ``L`` of the
covariance ``Sigma = L @ L.T``: a reparameterized Bartlett draw yields ``L`` directly, so the
Gaussian components ``z = L @ xi`` need no Cholesky decomposition (which can fail in float32 for
the ill-conditioned draws a Wishart with ``df = r`` produces) and no "retry with jitter".

``StandardNormal`` is an i.i.d. N(0, 1) block whose KL to itself is zero analytically, so the
non-centered Gaussian components cost nothing in the KL.

Example:
    >>> import torch
    >>> from torch.distributions import kl_divergence
    >>> q = WishartCholesky(df=torch.tensor(4.0), scale_tril=torch.eye(3) * 2.0)
    >>> p = WishartCholesky(df=torch.tensor(3.0), scale_tril=torch.eye(3))
    >>> L = q.rsample()
    >>> L.shape
    torch.Size([3, 3])
    >>> bool(kl_divergence(q, p) > 0)
    True
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import Chi2, Wishart, constraints
from torch.distributions.kl import register_kl

__all__ = ["WishartCholesky", "StandardNormal", "wishart_kl", "multivariate_digamma"]


class WishartCholesky(TorchDistribution):
    """Law of the lower Cholesky factor ``L`` of ``Sigma ~ Wishart(df, V = S @ S.T)``.

    Args:
        df: degrees of freedom, shape broadcastable to the batch shape; must exceed ``r - 1``.
        scale_tril: lower-triangular ``S`` with positive diagonal, shape ``batch + (r, r)``.

    ``log_prob(L)`` is the Wishart log-density of ``L @ L.T`` plus the log-Jacobian of the map
    ``L -> L @ L.T`` (``r log 2 + sum_i (r - i) log L_ii`` with ``i`` counted from 0), so it is a
    proper density on lower-triangular matrices. KL divergences equal those of the Wisharts.
    """

    arg_constraints = {"df": constraints.positive, "scale_tril": constraints.lower_cholesky}
    support = constraints.lower_cholesky
    has_rsample = True

    def __init__(self, df: torch.Tensor, scale_tril: torch.Tensor, validate_args: bool | None = None):
        if scale_tril.dim() < 2 or scale_tril.shape[-1] != scale_tril.shape[-2]:
            raise ValueError(f"scale_tril must be square in its last two dims, got shape {tuple(scale_tril.shape)}")
        rank = scale_tril.shape[-1]
        df = torch.as_tensor(df, dtype=scale_tril.dtype, device=scale_tril.device)
        batch_shape = torch.broadcast_shapes(df.shape, scale_tril.shape[:-2])
        self.df = df.expand(batch_shape)
        self.scale_tril = scale_tril.expand(batch_shape + (rank, rank))
        self.rank = rank
        if validate_args is not False and bool((self.df <= rank - 1).any()):
            raise ValueError(f"df must exceed r - 1 = {rank - 1}, got min df {float(self.df.min())}")
        super().__init__(batch_shape, torch.Size((rank, rank)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return WishartCholesky(
            self.df.expand(batch_shape),
            self.scale_tril.expand(batch_shape + (self.rank, self.rank)),
            validate_args=False,
        )

    @property
    def mean_covariance(self) -> torch.Tensor:
        """``E[L @ L.T] = df * S @ S.T``."""
        return self.df[..., None, None] * self.scale_tril @ self.scale_tril.transpose(-1, -2)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        """Bartlett draw ``L = S @ B``: ``B_ii = sqrt(chi2(df - i))``, ``B_ij ~ N(0, 1)`` below."""
        shape = torch.Size(sample_shape) + self.batch_shape
        r = self.rank
        offsets = torch.arange(r, dtype=self.df.dtype, device=self.df.device)
        chi2 = Chi2(self.df.unsqueeze(-1) - offsets).rsample(sample_shape)  # shape + (r,)
        below = torch.randn(shape + (r, r), dtype=self.df.dtype, device=self.df.device).tril(-1)
        bartlett = below + torch.diag_embed(chi2.sqrt())
        return self.scale_tril @ bartlett

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        wishart = Wishart(df=self.df, scale_tril=self.scale_tril, validate_args=False)
        covariance = value @ value.transpose(-1, -2)
        diag = torch.diagonal(value, dim1=-2, dim2=-1)
        powers = torch.arange(self.rank, 0, -1, dtype=value.dtype, device=value.device)  # r - i
        log_jacobian = self.rank * math.log(2.0) + (powers * diag.log()).sum(-1)
        return wishart.log_prob(covariance) + log_jacobian


def multivariate_digamma(a: torch.Tensor, p: int) -> torch.Tensor:
    """``psi_p(a) = sum_{i=1..p} psi(a + (1 - i) / 2)``, the derivative of ``mvlgamma(a, p)``."""
    offsets = (1.0 - torch.arange(1, p + 1, dtype=a.dtype, device=a.device)) / 2.0
    return torch.digamma(a.unsqueeze(-1) + offsets).sum(-1)


def wishart_kl(df_q: torch.Tensor, tril_q: torch.Tensor, df_p: torch.Tensor, tril_p: torch.Tensor) -> torch.Tensor:
    """Closed-form ``KL(Wishart(df_q, V_q) || Wishart(df_p, V_p))`` with ``V = tril @ tril.T``.

    ``df_p/2 (log|V_p| - log|V_q|) + df_q/2 (tr(V_p^-1 V_q) - r) + log Gamma_r(df_p/2)
    - log Gamma_r(df_q/2) + (df_q - df_p)/2 psi_r(df_q/2)``.
    """
    r = tril_q.shape[-1]
    logdet_q = 2.0 * torch.diagonal(tril_q, dim1=-2, dim2=-1).log().sum(-1)
    logdet_p = 2.0 * torch.diagonal(tril_p, dim1=-2, dim2=-1).log().sum(-1)
    # tr(V_p^-1 V_q) = ||tril_p^-1 tril_q||_F^2
    solved = torch.linalg.solve_triangular(tril_p, tril_q, upper=False)
    trace = solved.pow(2).sum((-1, -2))
    return (
        0.5 * df_p * (logdet_p - logdet_q)
        + 0.5 * df_q * (trace - r)
        + torch.mvlgamma(0.5 * df_p, r)
        - torch.mvlgamma(0.5 * df_q, r)
        + 0.5 * (df_q - df_p) * multivariate_digamma(0.5 * df_q, r)
    )


@register_kl(WishartCholesky, WishartCholesky)
def _kl_wishart_cholesky(q: WishartCholesky, p: WishartCholesky) -> torch.Tensor:
    return wishart_kl(q.df, q.scale_tril, p.df, p.scale_tril)


class StandardNormal(TorchDistribution):
    """I.i.d. N(0, 1) entries: ``batch_shape`` independent blocks of ``event_shape`` entries.

    Equal in law to ``Normal(0, 1).expand(batch_shape + event_shape).to_event(len(event_shape))``;
    its KL to another ``StandardNormal`` is zero without touching the event.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(
        self,
        batch_shape: torch.Size,
        event_shape: torch.Size,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        validate_args: bool | None = None,
    ):
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=validate_args)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        return StandardNormal(torch.Size(batch_shape), self.event_shape, self.dtype, self.device, validate_args=False)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        return torch.randn(shape, dtype=self.dtype, device=self.device)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.event_shape), 0))
        per_entry = -0.5 * value.pow(2) - 0.5 * math.log(2 * math.pi)
        return per_entry.sum(dims) if dims else per_entry


@register_kl(StandardNormal, StandardNormal)
def _kl_standard_normal(q: StandardNormal, p: StandardNormal) -> torch.Tensor:
    return torch.zeros(torch.broadcast_shapes(q.batch_shape, p.batch_shape), dtype=q.dtype, device=q.device)
