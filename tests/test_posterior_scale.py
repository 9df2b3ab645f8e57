"""Choosing the posterior's noise scale on a validation split (a lever for calibration)."""

from __future__ import annotations

import pytest
import torch

import pyro_monteclora
from pyro_monteclora import MonteCLoRA
from pyro_monteclora.prediction.posterior_scale import choose_factor, set_sample_scaler, tune_posterior_scale
from pyro_monteclora.prediction.predictive import Predictive
from pyro_monteclora.testing import nonzero_lora_b, tiny_bert, toy_sentiment, toy_tokenizer


@pytest.fixture
def bert():
    mc = MonteCLoRA.from_model(tiny_bert(vocab_size=16), lora_r=4, sample_scaler=0.05)
    nonzero_lora_b(mc.network)
    mc.tokenizer = toy_tokenizer()
    return mc


def test_the_noise_is_linear_in_the_scale_and_the_mean_adapter_does_not_move(bert):
    batch = {"input_ids": torch.tensor([[2, 4, 5, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    bert.eval()  # no LoRA dropout
    before = Predictive(bert, 5, seed=3).draw_noise()
    mean_before = bert.mean_logits(batch)
    set_sample_scaler(bert, 0.05 * 7)
    after = Predictive(bert, 5, seed=3).draw_noise()
    for name in before:  # the same draws, 7 times as far from A: each column's covariance x 49
        assert torch.allclose(after[name], 7 * before[name], rtol=1e-5, atol=1e-7)
    assert torch.equal(bert.mean_logits(batch), mean_before)  # E[A~] = A whatever the scale
    assert bert.monteclora_config.sample_scaler == pytest.approx(0.35)


def test_choose_factor_by_hand():
    assert choose_factor([1, 2, 4], [0.5, 0.4, 0.4], mean_nll=0.6) == 2  # ties: the smaller factor
    assert choose_factor([1, 2, 4, 8], [0.50, 0.49, 0.51, 0.70], mean_nll=0.50, rule="tolerance", tolerance=0.02) == 4
    assert choose_factor([2, 4], [0.9, 0.9], mean_nll=0.5, rule="tolerance", tolerance=0.1) == 2  # none within: smallest
    with pytest.raises(ValueError, match="rule"):
        choose_factor([1], [0.5], 0.5, rule="best")
    with pytest.raises(ValueError, match="one NLL per factor"):
        choose_factor([1, 2], [0.5], 0.5)


def test_tune_posterior_scale_picks_the_best_validation_nll_and_is_saved(bert, tmp_path):
    data = toy_sentiment(24)
    choice = tune_posterior_scale(bert, data, factors=(0.5, 1, 4, 16, 64), num_samples=4, seed=0)
    assert len(choice.nll) == len(choice.ece) == 5
    assert choice.factor == choice.factors[min(range(5), key=lambda i: choice.nll[i])]
    assert choice.sample_scaler == pytest.approx(0.05 * choice.factor)
    assert len(set(round(v, 6) for v in choice.nll)) > 1  # the scale matters once B != 0
    # the NLL at a factor is the predictive's at that scale, with the tuning's draws
    set_sample_scaler(bert, 0.05 * 16)
    at_16 = pyro_monteclora.evaluate(bert, data, num_samples=4, seed=0)["predictive"]["nll"]
    assert at_16 == pytest.approx(choice.nll[3], rel=1e-5)
    set_sample_scaler(bert, choice.sample_scaler)
    pyro_monteclora.save_pretrained(bert, tmp_path / "adapter")
    loaded = pyro_monteclora.load(tiny_bert(vocab_size=16), tmp_path / "adapter")
    assert loaded.model.sample_scaler == pytest.approx(choice.sample_scaler)
    assert loaded.monteclora_config.sample_scaler == pytest.approx(choice.sample_scaler)


def test_bad_arguments(bert):
    with pytest.raises(ValueError, match="factors must be positive"):
        tune_posterior_scale(bert, toy_sentiment(4), factors=(0, 1))
    with pytest.raises(ValueError, match="tolerance"):
        tune_posterior_scale(bert, toy_sentiment(4), rule="tolerance", tolerance=-1)


def test_the_automatic_search_on_a_known_curve(monkeypatch):
    """The geometric search on a convex validation curve with its minimum at factor 8."""
    from pyro_monteclora.prediction import posterior_scale

    calls = []

    def nll(factor):
        calls.append(factor)
        return (torch.log2(torch.tensor(factor)) - 3.2).abs().item()  # lowest at 2**3.2 = 9.19

    posterior_scale._search(nll, "nll", limit=0.0, max_factor=256)
    assert set(calls) >= {1, 2, 4, 8, 16}
    assert 16 in calls and 32 not in calls  # stops doubling once the NLL rises
    assert 8 * 2 ** 0.5 in calls and 8 * 2 ** -0.5 in calls  # then refines around the best
    calls.clear()
    posterior_scale._search(lambda f: (calls.append(f), abs(f - 0.25))[1], "nll", 0.0, 256)  # minimum below 1
    assert 0.25 in calls and 0.125 in calls
    calls.clear()
    posterior_scale._search(lambda f: (calls.append(f), 0.1 * f)[1], "tolerance", limit=0.45, max_factor=256)
    assert max(f for f in calls if 0.1 * f <= 0.45) == 4  # 0.1 * 4 = 0.4 within, 8 is not


def test_tune_posterior_scale_auto(bert):
    choice = tune_posterior_scale(bert, toy_sentiment(24), num_samples=2, seed=0)
    assert 3 <= len(choice.factors) <= 12 and choice.factor in choice.factors
    assert choice.nll[choice.factors.index(choice.factor)] == min(choice.nll)


def test_the_learned_variant_scales_every_learned_width_and_saves_them(tmp_path):
    """In the learned variant the factor multiplies the ELBO's column widths; eps and the widths' ratios stay."""
    mc = MonteCLoRA.from_model(tiny_bert(vocab_size=16), lora_r=4, variant="learned", sample_scaler=0.05)
    nonzero_lora_b(mc.network)
    mc.tokenizer = toy_tokenizer()
    torch.manual_seed(0)
    with torch.no_grad():  # widths that differ from column to column, as after training
        for posterior in mc.guide.posteriors.values():
            posterior.log_width.add_(0.5 * torch.randn_like(posterior.log_width))
    trained = {name: width.detach().clone() for name, width in mc.guide.widths().items()}
    data = toy_sentiment(24)
    choice = tune_posterior_scale(mc, data, factors=(0.5, 1, 4, 16), num_samples=4, seed=0)
    assert choice.factor == choice.factors[min(range(4), key=lambda i: choice.nll[i])]
    assert len(set(round(v, 6) for v in choice.nll)) > 1  # the width matters
    assert choice.sample_scaler == choice.trained_sample_scaler == pytest.approx(0.05)  # eps is not the lever here
    for name, width in mc.guide.widths().items():
        assert torch.allclose(width, choice.factor * trained[name], rtol=1e-5)
    # the NLL at factor 16 is the predictive's with every width x 16, with the tuning's draws
    with torch.no_grad():
        for name, posterior in mc.guide.posteriors.items():
            posterior.log_width.copy_((16 * trained[name]).log())
    at_16 = pyro_monteclora.evaluate(mc, data, num_samples=4, seed=0)["predictive"]["nll"]
    assert at_16 == pytest.approx(choice.nll[3], rel=1e-5)
    with torch.no_grad():
        for name, posterior in mc.guide.posteriors.items():
            posterior.log_width.copy_((choice.factor * trained[name]).log())
    pyro_monteclora.save_pretrained(mc, tmp_path / "adapter")
    loaded = pyro_monteclora.load(tiny_bert(vocab_size=16), tmp_path / "adapter")
    for name, width in loaded.guide.widths().items():
        assert torch.allclose(width, choice.factor * trained[name], rtol=1e-5)


@pytest.mark.parametrize("variant", ["paper", "learned"])
def test_a_failure_while_scoring_restores_the_trained_scale(variant, monkeypatch):
    """Scoring that fails halfway through the search leaves eps and every learned width as trained."""
    from pyro_monteclora.prediction import posterior_scale

    mc = MonteCLoRA.from_model(tiny_bert(vocab_size=16), lora_r=4, variant=variant, sample_scaler=0.05)
    mc.tokenizer = toy_tokenizer()
    widths = {name: w.detach().clone() for name, w in (mc.guide.widths() or {}).items()}
    real, calls = posterior_scale.predictive_outputs, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the mean adapter, factor 1, then factor 4 fails
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(posterior_scale, "predictive_outputs", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        tune_posterior_scale(mc, toy_sentiment(8), factors=(1, 4), num_samples=2, seed=0)
    assert len(calls) == 3
    assert mc.monteclora_config.sample_scaler == mc.model.sample_scaler == pytest.approx(0.05)
    for name, width in (mc.guide.widths() or {}).items():
        assert torch.equal(width, widths[name])
    assert (mc.guide.widths() is None) == (variant == "paper")
