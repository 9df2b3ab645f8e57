"""The multiple-choice likelihood (``task="multiple_choice"``): scores, gradients, the Categorical, training.

Ground truth for a choice's score is one plain forward pass of ``context + continuation``
(unpadded, no cache) summing the continuation tokens' log-probabilities; the shared-prompt path
(KV cache) and the one-pass-per-choice path (used under activation checkpointing) must both
equal it, in value and in gradient.
"""

from __future__ import annotations

import shutil

import pyro.poutine as poutine
import pytest
import torch
from datasets import Dataset

import pyro_monteclora
from pyro_monteclora import MonteCLoRA
from pyro_monteclora.data.choice_examples import collate_choices, tokenize_multiple_choice
from pyro_monteclora.models.choices import choice_log_likelihoods
from pyro_monteclora.models.likelihood import IGNORE_INDEX
from pyro_monteclora.prediction.choices import score_choices
from pyro_monteclora.testing import CharTokenizer, nonzero_lora_b, tiny_bert, tiny_bpe_tokenizer, tiny_llama
from pyro_monteclora.train import ELBOLoss

# 2 to 4 choices; " ab"/" ac" share scored tokens (they go in the prompt); "x"/"y" are one own token each
ROWS = [
    {"question": "Sky?", "choices": ["red", "blue"], "label": 1},
    {"question": "Ice is very?", "choices": ["cold", "hot", "warm water", "dry"], "label": 0},
    {"question": "Pick", "choices": ["ab", "ac", "b"], "label": 2},
]
ONE_TOKEN = [{"question": "Q1", "choices": ["x", "y"], "label": 0}, {"question": "Q22", "choices": ["y", "x"], "label": 1}]


def _reference(network, examples):
    """(n, K_max) summed continuation log-likelihoods, one unpadded forward pass per choice; -inf where absent."""
    k = max(len(e["choices"]) for e in examples)
    out = torch.full((len(examples), k), float("-inf"))
    for i, example in enumerate(examples):
        for j, choice in enumerate(example["choices"]):
            ids = torch.tensor([choice["input_ids"]])
            log_probs = torch.log_softmax(network(input_ids=ids).logits[0, :-1].float(), -1)
            labels = torch.tensor(choice["labels"][1:])
            scored = labels != IGNORE_INDEX
            out[i, j] = log_probs[scored].gather(1, labels[scored, None]).sum()
    return out


@pytest.fixture(scope="module")
def adapted():
    mc = MonteCLoRA.from_model(tiny_llama(), lora_r=4, lora_dropout=0.0)
    nonzero_lora_b(mc.network)  # the adapter changes the scores
    return mc.eval()


@pytest.mark.parametrize("rows", [ROWS, ONE_TOKEN], ids=["ragged", "one-token"])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_scores_equal_one_plain_pass_per_choice(adapted, rows, share_prompt):
    examples = tokenize_multiple_choice(rows, CharTokenizer(), max_length=64)
    batch = collate_choices(list(enumerate(examples)), pad_id=0)
    with torch.no_grad():
        scores = choice_log_likelihoods(adapted.network, batch, share_prompt=share_prompt)[0][0]
        want = _reference(adapted.network, examples)
    present = batch["choice_present"]
    assert torch.equal(present, torch.isfinite(want))
    assert torch.allclose(scores[present], want[present], atol=1e-4), (scores - want)[present].abs().max()
    if rows is ROWS:
        assert bool((batch["prompt_labels"] != IGNORE_INDEX).any())  # the shared scored tokens were exercised


def test_gradients_equal_between_the_cached_and_the_one_pass_per_choice_paths(adapted):
    batch = collate_choices(list(enumerate(tokenize_multiple_choice(ROWS, CharTokenizer(), 64))), pad_id=0)
    params = [p for n, p in adapted.network.named_parameters() if "lora_" in n]
    grads = []
    for share in (True, False):
        scores = choice_log_likelihoods(adapted.network, batch, share_prompt=share)[0][0]
        scores = scores.masked_fill(~batch["choice_present"], float("-inf"))
        loss = -torch.log_softmax(scores, -1).gather(1, batch["labels"][:, None]).sum()
        grads.append(torch.autograd.grad(loss, params))
    assert all(float(g.abs().max()) > 0 for g in grads[0])
    for cached, flat in zip(*grads):  # float32 round-off of two orders of summation, relative to the gradient's size
        assert float((cached - flat).norm()) <= 1e-5 * float(cached.norm()), (cached - flat).abs().max()


@pytest.mark.parametrize("choice_score", ["sum", "per_char"])
def test_the_model_observes_the_label_from_a_categorical_over_the_choices(choice_score):
    """With B = 0 the drawn noise on A leaves the network unchanged, so the model's logits are known exactly:
    the plain passes' scores (per character for per_char); obs is their Categorical, scaled to the dataset."""
    mc = MonteCLoRA.from_model(tiny_llama(), lora_r=4, task="multiple_choice", choice_score=choice_score)
    examples = tokenize_multiple_choice(ROWS, CharTokenizer(), 64)
    batch = collate_choices(list(enumerate(examples)), pad_id=0)
    trace = poutine.trace(mc.model).get_trace(batch, dataset_size=30)
    logits = trace.nodes["_RETURN"]["value"]
    want = _reference(mc.network, examples).detach()
    if choice_score == "per_char":
        want = want / batch["choice_lengths"]
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(logits), finite)
    assert torch.allclose(logits[finite].detach(), want[finite], atol=1e-4)
    site = trace.nodes["obs"]
    expected = 30 / 3 * torch.distributions.Categorical(logits=want).log_prob(batch["labels"]).sum()
    got = (site["fn"].log_prob(site["value"]) * site["scale"]).sum()
    assert torch.allclose(got.detach(), expected, atol=1e-3), (got, expected)
    # and the ELBO's nll is that log-likelihood per training example
    terms = ELBOLoss(mc.model, mc.guide)(batch, dataset_size=30)
    assert torch.allclose(terms.nll.detach(), -expected / 30, atol=1e-4)


def test_the_noise_reaches_the_choice_scores():
    mc = MonteCLoRA.from_model(tiny_llama(), lora_r=4, task="multiple_choice", sample_scaler=0.5)
    nonzero_lora_b(mc.network)
    batch = collate_choices(list(enumerate(tokenize_multiple_choice(ROWS, CharTokenizer(), 64))), pad_id=0)
    with torch.no_grad():
        mean = mc.mean_logits(batch)
        draws = torch.stack([mc.sample_logits(batch) for _ in range(2)])
    finite = torch.isfinite(mean)
    assert torch.equal(torch.isfinite(draws[0]), finite)
    assert float((draws[0] - mean)[finite].abs().max()) > 1e-3 and float((draws[0] - draws[1])[finite].abs().max()) > 1e-3


def _rows() -> list[dict]:
    # the right answer is always "nah" (which the base model ranks low), at index 0, 1 or 2 among 2 or 3 choices
    words = [f"{c} {t}" for c in ("red", "blue", "green", "gold") for t in ("sky", "sea", "sun", "tea")]
    orders = (["yes", "nah"], ["nah", "yes"], ["nah", "hmm", "yes"], ["hmm", "yes", "nah"])
    return [{"question": f"Is {w} warm?", "choices": orders[i % 4], "label": orders[i % 4].index("nah")}
            for i, w in enumerate(words)]


def _train(tokenizer, **overrides):
    settings = dict(tokenizer=tokenizer, task="multiple_choice", num_epochs=3, batch_size=4, learning_rate=2e-2,
                    lora_r=4, lora_dropout=0.0, progress=False, seed=3)
    settings.update(overrides)
    vocab = 64 if isinstance(tokenizer, CharTokenizer) else len(tokenizer)
    return pyro_monteclora.train(tiny_llama(vocab_size=vocab), _rows(), **settings)


def test_train_multiple_choice_learns_the_right_choice_and_checkpointing_takes_the_other_path(monkeypatch):
    labels = torch.tensor([r["label"] for r in _rows()])
    base = MonteCLoRA.from_model(tiny_llama(), lora_r=4, tokenizer=CharTokenizer())
    before = score_choices(base, _rows(), mode="mean")["sample_log_likelihood"][0]
    assert (before.argmax(-1) == labels).float().mean() < 0.7  # the base model does not know the rule
    result = _train(CharTokenizer(), eval_dataset=_rows())
    assert result.evaluations[-1]["accuracy"] == 1.0 and result.evaluations[-1]["nll"] < 0.3, result.evaluations
    assert result.history[-1]["nll"] < result.history[0]["nll"]
    assert result.model.task == "causal_lm"  # a plain causal-LM adapter: scored, saved and loaded like any other
    after = score_choices(result.model, _rows(), mode="mean")["sample_log_likelihood"][0]
    assert torch.equal(after.argmax(-1), labels)
    # activation checkpointing runs one pass per choice (transformers drops the cache): the same run
    import pyro_monteclora.models.choices as engine

    paths = []
    for name in ("_shared_prompt", "_one_pass_per_choice"):
        def spy(*args, _run=getattr(engine, name), _name=name):
            paths.append(_name)
            return _run(*args)
        monkeypatch.setattr(engine, name, spy)
    checkpointed = _train(CharTokenizer(), gradient_checkpointing=True, eval_every_epoch=False)
    assert len(paths) == 12 and set(paths) == {"_one_pass_per_choice"}, paths  # one per training step
    assert len(checkpointed.history) == len(result.history) == 12
    # the first epoch agrees to round-off; later Adam's normalization amplifies round-off on near-zero gradients
    for a, b in zip(result.history[:4], checkpointed.history[:4]):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"])), (a, b)
    assert checkpointed.history[-1]["nll"] < 0.5 * checkpointed.history[0]["nll"]


def test_multiple_choice_resumes_exactly_with_accumulation(tmp_path):
    tokenizer = tiny_bpe_tokenizer()
    common = dict(num_epochs=2, batch_size=2, gradient_accumulation_steps=2, save_steps=2, merge_adapter=False)
    full = _train(tokenizer, output_dir=str(tmp_path / "full"), **common)
    assert [int(r["step"]) for r in full.history] == list(range(1, 9))
    shutil.copytree(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = _train(tokenizer, output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=True, **common)
    assert [int(r["step"]) for r in resumed.history] == [5, 6, 7, 8]
    want = dict(full.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, want[name]), name


def test_multiple_choice_refuses_what_it_cannot_train():
    tokenizer = tiny_bpe_tokenizer()
    with pytest.raises(ValueError, match="question .or prompt., choices and label.*task='causal_lm'"):
        pyro_monteclora.train(tiny_llama(vocab_size=len(tokenizer)), Dataset.from_list(
            [{"prompt": "a", "completion": "b"}] * 4), tokenizer=tokenizer, task="multiple_choice", progress=False)
    with pytest.raises(ValueError, match="task='multiple_choice' needs a decoder"):
        MonteCLoRA.from_model(tiny_bert(), task="multiple_choice")
    with pytest.raises(ValueError, match="choice_score must be one of .*'sum', 'per_char'.*got 'mean'"):
        pyro_monteclora.MonteCLoRAConfig(choice_score="mean")
    with pytest.raises(ValueError, match="row 0: a choice has .* tokens.*max_length=3"):
        tokenize_multiple_choice([{"question": "q", "choices": ["a long answer", "b"], "label": 0}], CharTokenizer(), 3)


def test_choice_rows_under_auto_train_by_the_multiple_choice_likelihood():
    """The recommendation (benchmarks/results/arc.md): task='auto' gives a causal LM's choice rows their likelihood,
    with the cached path (checkpointing off by default); other rows keep their own task."""
    from pyro_monteclora.train.batches import with_likelihood

    result = _train(CharTokenizer(), task="auto", num_epochs=1)
    assert result.config.task == "multiple_choice"
    assert result.history[0]["nll"] < 1.2  # a Categorical over 2-3 choices (ln 3 = 1.10), not a per-token NLL
    causal = MonteCLoRA.from_model(tiny_llama(), lora_r=4)
    rows = Dataset.from_list(_rows())
    assert with_likelihood(causal.monteclora_config, causal, rows).task == "multiple_choice"
    assert with_likelihood(causal.monteclora_config.replace(task="causal_lm"), causal, rows).task == "causal_lm"
    sft = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    assert with_likelihood(causal.monteclora_config, causal, sft).task == "auto"
