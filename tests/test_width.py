"""The "learned" variant: its KL against torch.distributions, a conjugate problem whose posterior
is known, and the files, the predictive and the refusals of a learned-width model."""

from __future__ import annotations

import math
import types

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

import pyro_monteclora
from pyro_monteclora import MonteCLoRA, MonteCLoRAConfig
from pyro_monteclora.models.width import width_kl
from pyro_monteclora.prediction.draws import draw_latents
from pyro_monteclora.testing import nonzero_lora_b, tiny_bert, toy_sentiment, toy_tokenizer
from pyro_monteclora.train.elbo import ELBOLoss


def test_width_kl_equals_torch_distributions_column_by_column():
    torch.manual_seed(0)
    layers, r, d, n = 2, 3, 5, 4
    a = torch.randn(layers, r, d, dtype=torch.float64) * 0.3
    tril = torch.randn(layers, r, r, dtype=torch.float64).tril()
    tril.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(layers, r, dtype=torch.float64) + 0.5)
    weights = torch.distributions.Dirichlet(torch.ones(n, dtype=torch.float64)).sample((layers,))
    widths = torch.rand(layers, d, dtype=torch.float64) * 0.2 + 0.01
    ours = width_kl(a, tril, weights, widths, prior_std=0.2)
    expected = torch.zeros(layers, dtype=torch.float64)
    for layer in range(layers):
        q = (weights[layer] ** 2).sum()
        for j in range(d):
            scale = widths[layer, j] * q.sqrt() * tril[layer]
            column = MultivariateNormal(a[layer, :, j], scale_tril=scale)
            prior = MultivariateNormal(torch.zeros(r, dtype=torch.float64), 0.04 * torch.eye(r, dtype=torch.float64))
            expected[layer] += kl_divergence(column, prior)
    assert torch.allclose(ours, expected, rtol=1e-10, atol=1e-10)


def test_the_learned_variant_adds_a_width_per_column_that_the_kl_depends_on():
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4, variant="learned")
    paper = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    assert mc.num_extra_parameters() - paper.num_extra_parameters() == sum(
        g.num_layers * g.in_features for g in mc.groups)
    batch = {"input_ids": torch.tensor([[1, 5, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([1])}
    elbo = ELBOLoss(mc.model, mc.guide, cooperative_weight=0.0, prior_std=0.2)
    latents = draw_latents(mc, 3)
    pyro.set_rng_seed(0)
    before, noise = elbo(batch, 10).kl, mc.model.noise(latents)
    with torch.no_grad():
        for posterior in mc.guide.posteriors.values():
            posterior.log_width += math.log(10.0)  # ten times wider: nearer the prior's 0.2
    pyro.set_rng_seed(0)
    after, wider = elbo(batch, 10).kl, mc.model.noise(latents)
    assert after < before  # the KL depends on the width, and rewards it up to the prior's scale
    for name in noise:  # the same latents, ten times the noise: the width scales the draw
        assert torch.allclose(wider[name], 10 * noise[name], rtol=1e-5, atol=1e-12)


def _linear_problem(seed: int = 0):
    """y = X (w0 + a) + N(0, 0.5^2), X with orthogonal columns: the posterior of a is diagonal."""
    generator = torch.Generator().manual_seed(seed)
    n, d = 200, 4
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=generator))
    x = q * torch.tensor([2.0, 4.0, 8.0, 16.0])
    w0 = torch.randn(d, generator=generator)
    a_true = torch.tensor([0.5, -1.0, 0.25, 0.0])
    y = x @ (w0 + a_true) + 0.5 * torch.randn(n, generator=generator)
    return x, y, w0


class _Linear(nn.Module):
    """One linear layer, y = w0 . x: the adapted network of the conjugate problem."""

    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(len(w0), 1, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(w0[None])
        self.config = types.SimpleNamespace(use_return_dict=True, num_labels=1, to_dict=lambda: {}, model_type="linear")

    def forward(self, features=None, **_):
        return types.SimpleNamespace(logits=self.proj(features))


def test_the_learned_width_recovers_a_conjugate_gaussian_posterior():
    """Bayesian linear regression through one adapted layer (r = 1, B fixed at 1, alpha / r = 1).

    Prior a ~ N(0, 1), likelihood y ~ N(X (w0 + a), 0.5^2) with orthogonal columns: the posterior is
    N(m, Lambda^-1) with the diagonal precision Lambda = X^T X / 0.25 + I. The guide's column law is
    N(A_j, w_j^2 ||pi||^2 Sigma); the ELBO is maximized at E_q[w_j^2 ||pi||^2 Sigma] = 1 / Lambda_jj
    for any law of (Sigma, pi), so the q-marginal variance of each column is the exact posterior
    variance and A is its mean. Fitted by Adam on the ELBO (4 draws per step, 1000 steps, learning
    rate 0.03 decayed linearly to about 1e-3); the estimate of E_q[...] uses 20000 guide draws (Monte
    Carlo error under 2%). What is left is the optimizer's own noise: in our runs of this fit over
    several data seeds the largest relative error of the four variances was 6% to 11%. Tolerance: 20%
    on the variances, whose true values span 60x (0.059 ... 0.00098), and 3 posterior standard
    deviations on the means.
    """
    x, y, w0 = _linear_problem()
    torch.manual_seed(0)
    mc = MonteCLoRA.from_model(_Linear(w0), lora_r=1, lora_alpha=1, lora_dropout=0.0, task="classification",
                               variant="learned", prior_std=1.0, num_components=4, sample_scaler=0.05)
    (layer,) = [m for m in mc.network.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1.0)
        layer.lora_A["default"].weight.zero_()
    layer.lora_B["default"].weight.requires_grad_(False)

    def gaussian(logits, labels, dataset_size=None, subsample=None):
        with pyro.plate("data", size=dataset_size, subsample=subsample):
            return pyro.sample("obs", dist.Normal(logits[:, 0], 0.5), obs=labels)

    mc.model.likelihood = gaussian
    batch = {"features": x, "labels": y, "index": torch.arange(len(y))}
    elbo = ELBOLoss(mc.model, mc.guide, kl_weight=1.0, cooperative_weight=0.0, prior_std=1.0)
    parameters = [layer.lora_A["default"].weight, *mc.guide.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=0.03)
    steps, draws = 1000, 4
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: max(0.03, 1 - k / steps))
    for _ in range(steps):
        loss = sum(elbo(batch, len(y)).loss for _ in range(draws)) / draws
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    precision = torch.diag(x.T @ x) / 0.25 + 1.0
    mean = (x.T @ (y - x @ w0)) / 0.25 / precision
    with torch.no_grad():
        latents = draw_latents(mc, 20000)
        noise = mc.model.noise(latents)["d4"]  # (S, layers, r, d) = (S, 1, 1, 4)
        variance = noise.pow(2).mean(0)[0, 0]
    assert torch.allclose(variance, 1 / precision, rtol=0.2), (variance, 1 / precision)
    a = layer.lora_A["default"].weight[0].detach()
    assert ((a - mean).abs() < 3 * precision.rsqrt()).all(), (a, mean)


def test_a_learned_model_saves_loads_and_predicts_with_its_widths(tmp_path):
    mc = MonteCLoRA.from_model(tiny_bert(vocab_size=16), lora_r=4, variant="learned")
    nonzero_lora_b(mc.network)
    with torch.no_grad():
        for posterior in mc.guide.posteriors.values():
            posterior.log_width.normal_(-3.0, 0.5)
    folder = pyro_monteclora.save_pretrained(mc, str(tmp_path / "adapter"))
    again = pyro_monteclora.load(tiny_bert(vocab_size=16), folder)
    assert again.monteclora_config.variant == "learned"
    for name, posterior in mc.guide.posteriors.items():
        assert torch.equal(again.guide.posteriors[name].log_width, posterior.log_width)
    batch = {"input_ids": torch.tensor([[2, 4, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    first = pyro_monteclora.Predictive(mc, num_samples=4, seed=1)(batch)["probs"]
    second = pyro_monteclora.Predictive(again, num_samples=4, seed=1)(batch)["probs"]
    assert torch.equal(first, second)
    wider = pyro_monteclora.Predictive(mc, num_samples=4, seed=1, return_samples=True)(batch)["sample_probs"]
    assert (wider.max(0).values - wider.min(0).values).max() > 1e-4  # the widths make the draws differ


def test_train_learns_the_widths_at_the_guide_learning_rate():
    tokenizer = toy_tokenizer()
    result = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=tokenizer, num_epochs=2,
                                   batch_size=8, lora_r=4, variant="learned", guide_learning_rate=0.05,
                                   learning_rate=1e-3, progress=False, eval_every_epoch=False)
    moved = [(p.log_width - math.log(5e-3)).abs().max() for p in result.model.guide.posteriors.values()]
    assert max(moved) > 0.1  # 8 steps at 0.05: a learning rate of 1e-3 could move it by 0.008 at most
    assert result.history[-1]["kl"] > 0


def test_the_learned_variant_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="variant must be one of"):
        MonteCLoRAConfig(variant="wide")
    with pytest.raises(ValueError, match="use one or the other"):
        MonteCLoRAConfig(variant="learned", column_prior=True)
    with pytest.raises(ValueError, match="guide_learning_rate must be a positive number"):
        MonteCLoRAConfig(guide_learning_rate=0.0)


def test_blob_kl_schedule_weighs_an_epoch_like_the_elbo_and_late_steps_most():
    from pyro_monteclora.train.kl_schedule import kl_factor

    for m in (1, 3, 50, 5000):  # 2**5000 overflows a float: the factor must not
        factors = [kl_factor("blob", step, m) for step in range(1, m + 1)]
        assert math.isclose(sum(factors) / m, 1 - 1 / (2 ** (m + 1) - 1), rel_tol=1e-12)
        assert factors == sorted(factors) and kl_factor("blob", m + 1, m) == factors[0]  # the next epoch starts over
    with pytest.raises(ValueError, match="kl_schedule must be one of"):
        MonteCLoRAConfig(kl_schedule="linear")


def test_train_applies_the_kl_schedule_at_every_step():
    """The logged loss of each step is nll + factor(step) * kl + cooperative (kl_weight 1, cooperative weight 1);
    the factors of one epoch (4 steps) are 4/31, 8/31, 16/31, 32/31 times 4, so a constant weight would fail."""
    from pyro_monteclora.train.kl_schedule import kl_factor

    result = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=toy_tokenizer(), num_epochs=2,
                                   batch_size=8, lora_r=4, kl_schedule="blob", progress=False, eval_every_epoch=False,
                                   log_every=1, variant="learned")  # its KL is far from 0 from the start
    assert [h["step"] for h in result.history] == list(range(1, 9))
    for h in result.history:
        factor = (h["loss"] - h["nll"] - h["cooperative"]) / h["kl"]
        assert math.isclose(factor, kl_factor("blob", int(h["step"]), 4), rel_tol=1e-3), (h, factor)
