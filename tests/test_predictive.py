"""The posterior predictive: entropy split, seeding, vectorized draws, causal-LM scoring, evaluate()."""

from __future__ import annotations

import json
import math
import os

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyro_monteclora import MonteCLoRA
from pyro_monteclora.prediction.evaluation import evaluate
from pyro_monteclora.models.prior import site_names
from pyro_monteclora.prediction.predictive import Predictive, draw_latents, predict, predictive_summary
from pyro_monteclora.prediction.scoring import instruction_choices, multiple_choice, sequence_log_likelihood
from pyro_monteclora.testing import CharTokenizer, tiny_bert, tiny_llama, toy_tokenizer

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "commonsense")


def _randomize_lora_b(network: torch.nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero, which hides the noise on A."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


@pytest.fixture
def bert():
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4, sample_scaler=0.5, lora_dropout=0.1)
    _randomize_lora_b(mc.network)
    return mc


@pytest.fixture
def llama():
    mc = MonteCLoRA.from_model(tiny_llama(), lora_r=4, sample_scaler=0.5)
    _randomize_lora_b(mc.network)
    return mc


BATCH = {
    "input_ids": torch.tensor([[2, 5, 9, 3], [2, 7, 3, 0], [2, 11, 12, 3]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]),
    "labels": torch.tensor([0, 1, 1]),
}


def test_entropy_splits_into_aleatoric_and_epistemic(bert):
    out = Predictive(bert, num_samples=6, seed=0)(BATCH)
    assert torch.allclose(out["entropy"], out["expected_entropy"] + out["mutual_information"], atol=1e-6)
    assert bool((out["mutual_information"] >= 0).all())
    assert float(out["mutual_information"].max()) > 1e-4  # the noise is visible once B != 0
    assert torch.allclose(out["probs"].sum(-1), torch.ones(3), atol=1e-6)


def test_probs_are_the_mean_of_probabilities_not_of_logits(bert):
    out = Predictive(bert, num_samples=5, seed=3, return_samples=True)(BATCH)
    assert out["sample_probs"].shape == (5, 3, 2)
    assert torch.allclose(out["probs"], out["sample_probs"].mean(0), atol=1e-6)
    entropy = -(out["probs"] * out["probs"].log()).sum(-1)
    expected = -(out["sample_probs"] * out["sample_probs"].log()).sum(-1).mean(0)
    assert torch.allclose(out["entropy"], entropy, atol=1e-5)
    assert torch.allclose(out["expected_entropy"], expected, atol=1e-5)


def test_mean_mode_and_single_draw_have_no_mutual_information(bert):
    for predictive in (Predictive(bert, num_samples=1, seed=0), Predictive(bert, 4, mode="mean"), Predictive(bert, 0)):
        out = predictive(BATCH)
        assert bool((out["mutual_information"] == 0).all())
        assert torch.allclose(out["entropy"], out["expected_entropy"], atol=1e-6)
    bert.eval()
    mean = Predictive(bert, 4, mode="mean")(BATCH)["probs"]
    assert torch.allclose(mean, torch.softmax(bert.mean_logits(BATCH), -1), atol=1e-6)


def test_seeding_is_reproducible_and_leaves_the_global_rng_alone(bert):
    bert.train()  # dropout on: the predictive must switch it off and restore the flag
    state = torch.get_rng_state()
    a = Predictive(bert, 4, seed=0, return_samples=True)(BATCH)
    b = Predictive(bert, 4, seed=0, return_samples=True)(BATCH)
    c = Predictive(bert, 4, seed=1, return_samples=True)(BATCH)
    assert torch.equal(torch.get_rng_state(), state)
    assert bert.training and bert.network.training
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.allclose(a["sample_probs"], c["sample_probs"], atol=1e-4)


def test_vectorized_draws_equal_looped_forwards(bert):
    vectorized = Predictive(bert, 5, seed=2, return_samples=True, vectorize=True)(BATCH)
    looped = Predictive(bert, 5, seed=2, return_samples=True, vectorize=False)(BATCH)
    for key in vectorized:
        assert torch.allclose(vectorized[key], looped[key], atol=1e-5), key


def test_vectorized_draws_match_the_pyro_model_conditioned_on_each_draw(bert):
    """Draw s of the plated guide, fed to the Pyro model by poutine.condition, gives sample_probs[s]."""
    bert.eval()
    samples = 3
    with torch.random.fork_rng():
        torch.manual_seed(4)
        latents = draw_latents(bert, samples)
    out = Predictive(bert, samples, seed=4, return_samples=True)(BATCH)
    for s in range(samples):
        data = {}
        for group in bert.groups:
            names = site_names(group)
            for key, value in zip(("covariance", "weights", "components"), latents[group.name]):
                data[names[key]] = value[s]
        with torch.no_grad():
            logits = poutine.condition(bert.model, data=data)(BATCH)
        assert torch.allclose(torch.softmax(logits, -1), out["sample_probs"][s], atol=1e-5)


def test_latent_shapes_have_a_leading_sample_dimension(bert):
    latents = draw_latents(bert, 7)
    tril, weights, components = latents["d16"]
    assert tril.shape == (7, 6, 4, 4) and weights.shape == (7, 6, 4) and components.shape == (7, 6, 4, 16, 4)
    assert bert.model.noise(latents)["d16"].shape == (7, 6, 4, 16)


def test_predict_does_not_depend_on_batching(bert):
    rows = [{"input_ids": [2, 5 + i, 3]} for i in range(5)]
    whole = predict(bert, rows, num_samples=3, batch_size=5, seed=0, return_samples=True)
    pieces = predict(bert, rows, num_samples=3, batch_size=2, seed=0, return_samples=True)
    assert whole["sample_probs"].shape == (3, 5, 2)
    for key in whole:
        assert torch.allclose(whole[key], pieces[key], atol=1e-6)


def test_predictive_summary_of_identical_draws_has_zero_information():
    log_p = torch.log_softmax(torch.randn(1, 4, 3), -1).expand(5, 4, 3)
    out = predictive_summary(log_p)
    assert torch.allclose(out["mutual_information"], torch.zeros(4), atol=1e-6)


def test_invalid_arguments_raise(bert):
    with pytest.raises(ValueError, match="num_samples"):
        Predictive(bert, -1)
    with pytest.raises(ValueError, match="mode"):
        Predictive(bert, 2, mode="median")


# --- causal LM -------------------------------------------------------------------------------


def test_sequence_log_likelihood_is_a_log_mean_exp_over_draws(llama):
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 2], [1, 7, 8, 2]]),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 6, 2], [-100, 7, 8, 2]]),
    }
    out = Predictive(llama, 4, seed=0).sequence_log_likelihood(batch)
    per_draw = out["sample_log_likelihood"].double()
    assert per_draw.shape == (4, 2)
    expected = torch.log(per_draw.exp().mean(0))
    assert torch.allclose(out["log_likelihood"].double(), expected, atol=1e-5)
    assert float(per_draw.std(0).max()) > 1e-3  # draws differ
    # the mean adapter scores exactly like transformers' cross-entropy on the kept tokens
    llama.eval()
    mean = Predictive(llama, 4, mode="mean").sequence_log_likelihood(batch)["log_likelihood"]
    logits = llama.mean_logits(batch)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="none"
    ).sum(-1)
    assert torch.allclose(mean, -nll, atol=1e-4)


def test_multiple_choice_is_a_distribution_over_candidates(llama):
    tokenizer = CharTokenizer()
    prompts = ["is fire hot?", {"instruction": "is ice hot?", "input": ""}, "two plus two"]
    candidates = ["the answer is true", "the answer is false"]
    out = multiple_choice(llama, prompts, candidates, num_samples=4, seed=0, tokenizer=tokenizer, batch_size=4,
                          return_samples=True)
    assert out["probs"].shape == (3, 2) and out["sample_log_likelihood"].shape == (4, 3, 2)
    assert torch.allclose(out["probs"].sum(-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(out["entropy"], out["expected_entropy"] + out["mutual_information"], atol=1e-6)
    per_draw = torch.softmax(out["sample_log_likelihood"].double(), -1).mean(0)
    assert torch.allclose(out["probs"].double(), per_draw, atol=1e-6)
    # the scores are the sequence log-likelihoods of the completions
    flat = sequence_log_likelihood(llama, [prompts[0]] * 2, candidates, num_samples=4, seed=0, tokenizer=tokenizer)
    per_draw_first = out["sample_log_likelihood"][:, 0].double()
    assert torch.allclose(flat.double(), torch.logsumexp(per_draw_first, 0) - math.log(4), atol=1e-4)
    mean = multiple_choice(llama, prompts, candidates, mode="mean", tokenizer=tokenizer)
    assert bool((mean["mutual_information"] == 0).all())


def test_instruction_choices_on_the_commonsense_rows():
    for name, size in (("boolq", 2), ("ARC-Easy", 4), ("openbookqa", 4)):
        path = os.path.join(DATA, name, "test.json")
        if not os.path.exists(path):
            pytest.skip("shared commonsense data not found")
        with open(path, encoding="utf-8") as handle:
            row = json.load(handle)[0]
        completions, label = instruction_choices(row)
        assert len(completions) == size
        assert completions[label] == row["output"]


def test_evaluate_a_classifier_and_a_causal_lm(bert, llama, tmp_path):
    data = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}, {"text": "good", "label": 1}]
    state = torch.get_rng_state()
    result = evaluate(bert, data, num_samples=3, batch_size=2, tokenizer=toy_tokenizer(["good", "bad", "film"]))
    assert torch.equal(torch.get_rng_state(), state)
    assert set(result) == {"mean", "predictive"}
    assert set(result["mean"]) == {"accuracy", "nll", "brier", "ece", "aurc"}
    assert result["mean"] != result["predictive"]
    rows = [
        {"instruction": "Is it true?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"},
        {"instruction": "Is it false?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is false", "answer": "false"},
    ]
    lm = evaluate(llama, rows, num_samples=2, tokenizer=CharTokenizer())
    assert 0.0 <= lm["predictive"]["ece"] <= 1.0 and lm["predictive"]["nll"] > 0


@pytest.mark.parametrize("mode,vectorize,eos", [("sample", True, True), ("sample", False, True), ("mean", True, True),
                                               ("sample", True, False)])
def test_shared_prompt_scoring_equals_one_pass_per_candidate(llama, mode, vectorize, eos):
    """The cached prompt + candidate rests give the scores of full passes (prompts of several lengths,
    candidates of several lengths sharing a prefix, an instruction row)."""
    tokenizer = CharTokenizer()
    prompts = ["is fire hot?", {"instruction": "is ice hot?", "input": ""}, "two plus two", "a"]
    candidates = [["answer1", "answer2", "answer33"], ["the answer is true", "the answer is false", "no"],
                  ["x", "yy", "zzz"], ["answer1", "answer2", "answer3"]]
    from pyro_monteclora.prediction.shared_prompt import cache_argument

    assert cache_argument(llama.network) is not None  # the shared path is the one under test
    if not eos:  # one own token per candidate: all scored from the prompt's pass
        candidates = [["a", "b", "c"]] * 4
    kwargs = dict(num_samples=3, seed=0, mode=mode, tokenizer=tokenizer, batch_size=6, vectorize=vectorize, append_eos=eos)
    shared = multiple_choice(llama, prompts, candidates, share_prompt=True, **kwargs)["sample_log_likelihood"]
    full = multiple_choice(llama, prompts, candidates, share_prompt=False, **kwargs)["sample_log_likelihood"]
    assert shared.shape == full.shape == ((1 if mode == "mean" else 3), 4, 3)
    assert torch.isfinite(shared).all()
    assert torch.allclose(shared, full, atol=1e-4, rtol=1e-5), (shared - full).abs().max()
    if mode == "sample":  # the draws differ, so equality is not the mean adapter's by accident
        assert float(shared.std(0).max()) > 1e-3


def test_network_candidate_scores_of_a_plain_network_are_the_mean_adapters(llama):
    from pyro_monteclora.prediction.scoring import scored_examples
    from pyro_monteclora.prediction.shared_prompt import network_candidate_scores

    tokenizer = CharTokenizer()
    prompts, candidates = ["is fire hot?", "two plus two"], ["answer1", "answer2", "answer3"]
    mean = multiple_choice(llama, prompts, candidates, mode="mean", tokenizer=tokenizer)["sample_log_likelihood"]
    examples = scored_examples(tokenizer, [p for p in prompts for _ in candidates], candidates * 2, True)
    llama.eval()
    scores = network_candidate_scores(llama.network, examples, 3, 0, batch_size=6, repeats=2)
    assert scores.shape == (2, 2, 3)
    assert torch.allclose(scores, mean.expand(2, 2, 3), atol=1e-5)
