"""Selective prediction and OOD detection metrics against hand computations and brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from pyro_monteclora import MonteCLoRA
from pyro_monteclora.testing import nonzero_lora_b, tiny_bert
from pyro_monteclora.prediction.uncertainty import (
    coverage_plot,
    detection_metrics,
    ood_scores,
    score_histograms,
    selective_prediction,
)


def test_selective_prediction_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([0, 1, 1, 0, 0])  # confidence order: 0.9 ok, 0.8 wrong, 0.7 ok, 0.6 ok, 0.55 wrong
    curve = selective_prediction(probs, labels)
    assert curve["coverage"].tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert torch.allclose(curve["accuracy"], torch.tensor([1, 1 / 2, 2 / 3, 3 / 4, 3 / 5], dtype=torch.float64))
    assert curve["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4 + 2 / 5) / 5)
    # another confidence (say, minus the mutual information) reorders the answers
    other = selective_prediction(probs, labels, confidence=torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0]))
    assert other["accuracy"].tolist() == [1.0, 1.0, 1.0, 0.75, 0.6]


def _brute_force(inside, outside):
    pairs = list(itertools.product(inside.tolist(), outside.tolist()))
    auroc = sum(1.0 if o > i else 0.5 if o == i else 0.0 for i, o in pairs) / len(pairs)
    scores = inside.tolist() + outside.tolist()
    positive = [0] * len(inside) + [1] * len(outside)
    precisions = []
    for value in outside.tolist():
        flagged = [p for s, p in zip(scores, positive) if s >= value]
        precisions.append(sum(flagged) / len(flagged))
    needed = -(-95 * len(outside) // 100)  # ceil(0.95 n)
    threshold = sorted(outside.tolist(), reverse=True)[needed - 1]
    fpr = sum(1 for s in inside.tolist() if s >= threshold) / len(inside)
    return auroc, sum(precisions) / len(precisions), fpr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_metrics_match_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    inside = torch.randint(0, 6, (23,), generator=g).double()
    outside = torch.randint(2, 9, (17,), generator=g).double()
    got = detection_metrics(inside, outside)
    auroc, aupr, fpr = _brute_force(inside, outside)
    assert got["auroc"] == pytest.approx(auroc) and got["aupr"] == pytest.approx(aupr) and got["fpr95"] == pytest.approx(fpr)


def test_detection_metrics_extremes():
    separated = detection_metrics(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0, 4.0]))
    assert separated == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    reversed_ = detection_metrics(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]))
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 1.0
    with pytest.raises(ValueError, match="at least one"):
        detection_metrics(torch.tensor([]), torch.tensor([1.0]))


def test_ood_scores_on_a_classifier_and_the_plots(word_tokenizer, tmp_path):
    mc = MonteCLoRA.from_model(tiny_bert(vocab_size=16), lora_r=4, sample_scaler=0.3)
    nonzero_lora_b(mc.network)
    mc.tokenizer = word_tokenizer
    result = ood_scores(mc, ["the good", "good is", "the bad"], ["is is is", "bad bad"], num_samples=4, return_scores=True)
    assert set(result) == {"max_probability", "entropy", "mutual_information", "scores"}
    for name in ("max_probability", "entropy", "mutual_information"):
        assert set(result[name]) == {"auroc", "aupr", "fpr95"} and 0 <= result[name]["auroc"] <= 1
        inside, outside = result["scores"][name]
        assert inside.shape == (3,) and outside.shape == (2,)
    assert (result["scores"]["mutual_information"][0] > 0).all()  # the draws disagree a little
    curve = selective_prediction(torch.tensor([[0.9, 0.1], [0.4, 0.6]]), torch.tensor([0, 0]))
    assert (tmp_path / "c.png").exists() is False
    assert coverage_plot({"ours": curve}, str(tmp_path / "c.png")) and (tmp_path / "c.png").stat().st_size > 1000
    assert score_histograms(result["scores"], str(tmp_path / "h.png")) and (tmp_path / "h.png").stat().st_size > 1000


def test_ood_scores_on_a_causal_lm_score_both_sets_over_the_same_candidates(word_tokenizer):
    from pyro_monteclora.testing import tiny_llama

    mc = MonteCLoRA.from_model(tiny_llama(vocab_size=16), lora_r=4, sample_scaler=0.3)
    nonzero_lora_b(mc.network)
    mc.tokenizer = word_tokenizer
    inside = [{"prompt": "the good is"}, {"prompt": "good is"}]
    outside = [{"prompt": "bad bad bad"}, {"prompt": "is"}, {"prompt": "the"}]
    with pytest.raises(ValueError, match="pass candidates"):
        ood_scores(mc, inside, outside)
    result = ood_scores(mc, inside, outside, num_samples=3, candidates=["good", "bad"], return_scores=True)
    assert result["scores"]["entropy"][0].shape == (2,) and result["scores"]["entropy"][1].shape == (3,)
    assert all(0 <= result[name]["auroc"] <= 1 for name in ("max_probability", "entropy", "mutual_information"))


def test_evaluate_reports_selective_prediction(word_tokenizer):
    from pyro_monteclora import evaluate

    mc = MonteCLoRA.from_model(tiny_bert(vocab_size=16), lora_r=4, sample_scaler=0.3)
    nonzero_lora_b(mc.network)
    data = [{"text": t, "label": i % 2} for i, t in enumerate(["the good", "good is", "the bad", "bad is", "is"])]
    result = evaluate(mc, data, num_samples=3, tokenizer=word_tokenizer, return_curves=True)
    for name in ("mean", "predictive"):
        curve = result["curves"][name]
        assert len(curve["coverage"]) == 5 and curve["coverage"][-1] == 1.0
        assert curve["accuracy"][-1] == pytest.approx(result[name]["accuracy"])  # full coverage: plain accuracy
        assert result[name]["aurc"] == pytest.approx(sum(1 - a for a in curve["accuracy"]) / 5)
