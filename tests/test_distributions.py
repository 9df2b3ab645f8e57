"""Densities and KLs of the latents against torch.distributions, closed forms and Monte Carlo.

Monte Carlo tolerances are 5 standard errors of the estimate (fixed seeds).
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from torch.distributions import Dirichlet, Normal, Wishart, kl_divergence

from pyro_monteclora.distributions import StandardNormal, WishartCholesky, multivariate_digamma, wishart_kl


def _tril(values):
    return torch.linalg.cholesky(torch.as_tensor(values, dtype=torch.float64))


CASES = [  # (df_q, V_q, df_p, V_p)
    (4.0, [[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], 3.0, torch.eye(3).tolist()),
    (3.0, torch.diag(torch.tensor([0.5, 2.0, 1.5])).tolist(), 3.0, torch.eye(3).tolist()),
    (6.5, torch.eye(3).tolist(), 4.0, [[1.0, 0.5, 0.0], [0.5, 2.0, 0.0], [0.0, 0.0, 3.0]]),
]


@pytest.mark.filterwarnings("ignore:Singular sample detected")
@pytest.mark.parametrize("df_q,V_q,df_p,V_p", CASES)
def test_wishart_kl_matches_monte_carlo(df_q, V_q, df_p, V_p):
    torch.manual_seed(0)
    q = Wishart(torch.tensor(df_q, dtype=torch.float64), scale_tril=_tril(V_q))
    p = Wishart(torch.tensor(df_p, dtype=torch.float64), scale_tril=_tril(V_p))
    n = 40_000
    draws = q.sample((n,))
    log_ratio = q.log_prob(draws) - p.log_prob(draws)
    estimate, stderr = log_ratio.mean(), log_ratio.std() / math.sqrt(n)
    closed = wishart_kl(q.df, _tril(V_q), p.df, _tril(V_p))
    assert abs(closed - estimate) < 5 * stderr + 1e-9, (float(closed), float(estimate), float(stderr))


def test_wishart_kl_is_zero_for_equal_and_positive_otherwise():
    tril = _tril(CASES[0][1])
    df = torch.tensor(4.0, dtype=torch.float64)
    assert abs(float(wishart_kl(df, tril, df, tril))) < 1e-10
    assert float(wishart_kl(df + 1, tril, df, tril)) > 0
    assert float(wishart_kl(df, 2 * tril, df, tril)) > 0


def test_multivariate_digamma_is_derivative_of_mvlgamma():
    a = torch.tensor(3.7, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.mvlgamma(a, 4), a)
    assert torch.allclose(grad, multivariate_digamma(a.detach(), 4), atol=1e-10)


def test_cholesky_wishart_log_prob_r1_is_a_scaled_chi_density():
    # r = 1: L = s * sqrt(chi2(df)) follows a chi law with df degrees of freedom, scaled by s.
    df, s = 3.5, 1.7
    dist = WishartCholesky(torch.tensor(df, dtype=torch.float64), torch.tensor([[s]], dtype=torch.float64))
    values = torch.tensor([0.3, 1.0, 2.5, 4.0], dtype=torch.float64)
    ours = dist.log_prob(values.reshape(-1, 1, 1))
    reference = torch.tensor(scipy.stats.chi(df, scale=s).logpdf(values.numpy()))
    assert torch.allclose(ours, reference, atol=1e-10)


def test_cholesky_wishart_samples_have_the_wishart_mean():
    torch.manual_seed(1)
    tril = _tril(CASES[0][1])
    dist = WishartCholesky(torch.tensor(4.0, dtype=torch.float64), tril)
    n = 40_000
    L = dist.rsample((n,))
    assert torch.allclose(L, L.tril()) and bool((torch.diagonal(L, dim1=-2, dim2=-1) > 0).all())
    cov = L @ L.transpose(-1, -2)
    mean, stderr = cov.mean(0), cov.std(0) / math.sqrt(n)
    assert bool(((mean - dist.mean_covariance).abs() < 5 * stderr + 1e-9).all())


def test_cholesky_wishart_kl_equals_wishart_kl_and_its_own_monte_carlo():
    # KL is invariant under the bijection L -> L L^T: the log-density must carry the Jacobian.
    torch.manual_seed(2)
    df_q, V_q, df_p, V_p = CASES[0]
    q = WishartCholesky(torch.tensor(df_q, dtype=torch.float64), _tril(V_q))
    p = WishartCholesky(torch.tensor(df_p, dtype=torch.float64), _tril(V_p))
    analytic = kl_divergence(q, p)
    assert torch.allclose(analytic, wishart_kl(q.df, q.scale_tril, p.df, p.scale_tril))
    n = 40_000
    L = q.rsample((n,))
    log_ratio = q.log_prob(L) - p.log_prob(L)
    assert abs(analytic - log_ratio.mean()) < 5 * log_ratio.std() / math.sqrt(n)


def test_cholesky_wishart_is_batched_and_reparameterized():
    scale = torch.ones(5, 3, requires_grad=True)
    dist = WishartCholesky(torch.tensor(3.0), torch.diag_embed(scale))
    L = dist.rsample()
    assert L.shape == (5, 3, 3) and dist.batch_shape == (5,)
    L.sum().backward()
    assert scale.grad is not None and bool(scale.grad.abs().sum() > 0)
    assert dist.expand((2, 5)).rsample().shape == (2, 5, 3, 3)


def test_cholesky_wishart_rejects_improper_df():
    with pytest.raises(ValueError, match="df must exceed"):
        WishartCholesky(torch.tensor(1.5), torch.eye(3))


def test_dirichlet_kl_reference_value():
    # The reference implementations' hand-written KL gets this wrong (~3.04); the truth is ~0.27.
    kl = kl_divergence(Dirichlet(torch.tensor([3.0, 3.0])), Dirichlet(torch.tensor([1.0, 1.0])))
    # closed form: log G(6) - 2 log G(3) + 2 * 2 * (psi(3) - psi(6)) = log 30 - 4 (1/3 + 1/4 + 1/5)
    assert abs(float(kl) - (math.log(30.0) - 4 * (1 / 3 + 1 / 4 + 1 / 5))) < 1e-5


def test_standard_normal_log_prob_and_kl():
    dist = StandardNormal(torch.Size([2]), torch.Size([3, 4]))
    x = dist.rsample((5,))
    assert x.shape == (5, 2, 3, 4)
    reference = Normal(0.0, 1.0).log_prob(x).sum((-1, -2))
    assert torch.allclose(dist.log_prob(x), reference, atol=1e-5)
    kl = kl_divergence(dist, StandardNormal(torch.Size([2]), torch.Size([3, 4])))
    assert kl.shape == (2,) and bool((kl == 0).all())
    assert dist.expand((7, 2)).rsample().shape == (7, 2, 3, 4)
