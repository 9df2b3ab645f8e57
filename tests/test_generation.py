"""Greedy generation with answer extraction (the paper's evaluation)."""

from __future__ import annotations

import pytest

from pyro_monteclora import MonteCLoRA
from pyro_monteclora.prediction.generation import extract_answer, generate_answers
from pyro_monteclora.testing import tiny_llama, toy_tokenizer

CHOICES = ["answer1", "answer2", "answer3", "answer4"]


@pytest.mark.parametrize("text,expected", [
    ("the correct answer is answer2", "answer2"),
    ("Answer4, or maybe answer1", "answer4"),        # the first one found, any case
    ("the correct answer is answer", None),          # a prefix is not an answer
    ("xanswer1 answer3", "answer3"),                 # whole words only
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text, CHOICES) == expected


def test_true_false_as_whole_words():
    assert extract_answer("this is untrue, so false", ["true", "false"]) == "false"


def test_generate_answers_uses_the_mean_adapter_and_counts_right_answers():
    tokenizer = toy_tokenizer(["the", "is", "good", "bad", "true", "false"])
    mc = MonteCLoRA.from_model(tiny_llama(vocab_size=16), lora_r=4)
    rows = [{"instruction": "good is\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true",
             "answer": answer} for answer in ("true", "false", "true")]
    out = generate_answers(mc, rows, tokenizer, max_new_tokens=4, batch_size=2)
    assert len(out["responses"]) == 3 and 0 <= out["accuracy"] <= out["answered"] <= 1
    expected = sum(p == r["answer"] for p, r in zip(out["predictions"], rows)) / 3
    assert out["accuracy"] == expected
    assert generate_answers(mc.network, rows, tokenizer, max_new_tokens=4)["responses"] == out["responses"]
    assert tokenizer.padding_side == "right"  # restored
    with pytest.raises(ValueError, match="at least one row"):
        generate_answers(mc, [], tokenizer)
