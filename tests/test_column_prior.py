"""The prior on A~'s columns with an empirical-Bayes scale: its KL, its place in the ELBO, its effect.

The column law it rests on, ``A~_j | Sigma, pi ~ N(A_j, eps^2 ||pi||^2 Sigma)``, is checked by Monte
Carlo in ``test_model.py::test_collapsed_components_have_the_same_law``.
"""

from __future__ import annotations

import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import Dirichlet, MultivariateNormal, kl_divergence

from pyro_monteclora import MonteCLoRA, MonteCLoRAConfig
from pyro_monteclora.models.column_prior import column_prior_kl, column_prior_scale
from pyro_monteclora.testing import nonzero_lora_b, tiny_bert
from pyro_monteclora.train import ELBOLoss

from test_model import _batch



def _latents(layers=2, r=3, d=5, n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(layers, r, d, generator=generator, dtype=torch.float64)
    tril = torch.randn(layers, r, r, generator=generator, dtype=torch.float64).tril()
    tril.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(layers, r, generator=generator, dtype=torch.float64) + 0.5)
    tril.diagonal(dim1=-2, dim2=-1).mul_(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)[:r])  # a sign flip
    weights = Dirichlet(torch.ones(layers, n, dtype=torch.float64)).sample()
    return a, tril, weights


def _reference_kl(a, tril, weights, scaler, variance):
    """sum_j KL(N(A_j, C) || N(0, variance I)) per layer, by torch.distributions."""
    out = []
    for layer in range(a.shape[0]):
        cov = scaler**2 * (weights[layer] ** 2).sum() * tril[layer] @ tril[layer].T
        r = cov.shape[0]
        prior = MultivariateNormal(torch.zeros(r, dtype=a.dtype), variance[layer] * torch.eye(r, dtype=a.dtype))
        out.append(sum(kl_divergence(MultivariateNormal(a[layer, :, j], cov), prior) for j in range(a.shape[2])))
    return torch.stack(out)


def test_closed_form_equals_torch_distributions_at_the_optimal_scale():
    a, tril, weights = _latents()
    scaler = 0.3
    variance = column_prior_scale(a, tril, weights, scaler)
    got = column_prior_kl(a, tril, weights, scaler)
    want = _reference_kl(a, tril, weights, scaler, variance)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (got, want)
    assert bool((got > 0).all())


def test_the_scale_maximizes_the_elbo():
    a, tril, weights = _latents(seed=1)
    scaler = 0.2
    variance = column_prior_scale(a, tril, weights, scaler)
    at_optimum = _reference_kl(a, tril, weights, scaler, variance)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert bool((_reference_kl(a, tril, weights, scaler, variance * factor) > at_optimum).all()), factor
    log_variance = variance.log().clone().requires_grad_(True)
    _reference_kl(a, tril, weights, scaler, log_variance.exp()).sum().backward()
    assert float(log_variance.grad.abs().max()) < 1e-9  # stationary in the scale


def test_kl_is_zero_for_an_isotropic_posterior_around_zero_and_falls_as_it_widens():
    r, d = 3, 5
    zero = torch.zeros(1, r, d, dtype=torch.float64)
    weights = torch.full((1, 4), 0.25, dtype=torch.float64)
    eye = torch.eye(r, dtype=torch.float64)[None]
    assert abs(float(column_prior_kl(zero, 0.7 * eye, weights, 0.1))) < 1e-12
    a, _, _ = _latents(layers=1, r=r, d=d)
    widths = [column_prior_kl(a, c * eye, weights, 0.1) for c in (0.5, 1.0, 2.0, 4.0)]
    assert all(float(x) > float(y) for x, y in zip(widths, widths[1:]))  # the ELBO rewards width


def test_elbo_adds_the_column_kl_at_the_guides_draw():
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4, cooperative_weight=0.0)
    nonzero_lora_b(mc.network)
    mc.eval()
    batch, dataset_size = _batch(), 30
    torch.manual_seed(5)
    plain = ELBOLoss(mc.model, mc.guide, 1.0, 0.0)(batch, dataset_size)
    torch.manual_seed(5)
    with_prior = ELBOLoss(mc.model, mc.guide, 1.0, 0.0, column_prior=True)(batch, dataset_size)
    torch.manual_seed(5)
    trace = poutine.trace(mc.guide).get_trace(batch, dataset_size)
    means = mc.model.lora_a()
    column = 0.0
    for group in mc.groups:
        module = mc.network.get_submodule("base_model.model." + group.module_names[-1]).lora_A["default"]
        assert torch.equal(means[group.name][-1], module.weight)  # A stacked in group order
        column = column + column_prior_kl(means[group.name], trace.nodes[f"{group.name}.covariance_tril"]["value"],
                                          trace.nodes[f"{group.name}.weights"]["value"], 5e-3).sum()
    assert float(column.detach()) > 1.0
    assert torch.allclose(with_prior.nll, plain.nll)
    assert torch.allclose(with_prior.kl, plain.kl + column / dataset_size, rtol=1e-6)
    assert torch.allclose(with_prior.loss, with_prior.nll + with_prior.kl)
    with_prior.loss.backward()  # the column KL reaches A and the guide's scale
    assert all(m.weight.grad is not None for modules in mc.model.lora_a_modules.values() for m in modules)
    assert all(float(p.log_scale_diag.grad.abs().sum()) > 0 for p in mc.guide.posteriors.values())


def test_training_with_the_column_prior_widens_the_posterior(word_tokenizer):
    import pyro_monteclora
    from pyro_monteclora.testing import toy_sentiment

    widths = {}
    for on in (False, True):
        result = pyro_monteclora.train(
            tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=word_tokenizer, lora_r=4, num_epochs=2,
            batch_size=8, learning_rate=1e-2, column_prior=on, progress=False, seed=0,
        )
        widths[on] = torch.cat([p.log_scale_diag.detach().reshape(-1) for p in result.model.guide.posteriors.values()])
        assert all(torch.isfinite(torch.tensor(r["kl"])) for r in result.history)
    # 8 AdamW steps at 1e-2 (warm-up, linear decay) move a parameter by at most ~0.045: the column KL pushes
    # every log-scale up at about that rate, the plain ELBO's KL keeps them near the prior's 0
    assert float(widths[True].min()) > 0.03 and float(widths[False].abs().max()) < 0.01, widths


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_column_prior_must_be_a_bool(value):
    with pytest.raises(ValueError, match=f"column_prior must be True or False, got {value!r}"):
        MonteCLoRAConfig(column_prior=value)


def test_the_paper_has_no_column_prior_and_old_configs_load_without_it():
    assert MonteCLoRAConfig.paper(column_prior=True).column_prior is True
    assert MonteCLoRAConfig.paper().column_prior is False
    saved = MonteCLoRAConfig().to_dict()
    del saved["column_prior"]  # a config written before the field existed
    assert MonteCLoRAConfig.from_dict(saved).column_prior is False
