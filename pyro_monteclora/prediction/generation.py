"""The paper's own evaluation of instruction-tuned models: greedy generation and answer extraction.

The commonsense rows end their instruction with ``Answer format: a/b/...``; the model
generates a response greedily, and the first allowed answer found in it (as a whole word) is
its prediction (no answer found: wrong). This is the accuracy the MonteCLoRA paper reports;
:func:`pyro_monteclora.evaluate` instead scores the candidates, which also gives calibrated
probabilities.

Example:
    >>> extract_answer("The correct answer is answer3.", ["answer1", "answer2", "answer3", "answer4"])
    'answer3'
    >>> extract_answer("I think it is true, not false", ["true", "false"])
    'true'
    >>> extract_answer("no idea", ["true", "false"]) is None
    True
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import torch

from ..data.tokenize import format_instruction
from .scoring import ANSWER_FORMAT

__all__ = ["extract_answer", "generate_answers"]


def extract_answer(text: str, choices: Sequence[str]) -> Optional[str]:
    """The allowed answer that occurs first in ``text`` as a whole word (case-insensitive), or ``None``."""
    found = []
    for choice in choices:
        match = re.search(rf"(?<![\w]){re.escape(choice)}(?![\w])", text, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), choice))
    return min(found)[1] if found else None


@torch.no_grad()
def generate_answers(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Greedy responses to instruction rows and the accuracy of the answers extracted from them.

    Args:
        model: a causal LM (a :class:`~pyro_monteclora.MonteCLoRA` generates with its mean
            adapter, ``E[A~] = A``; a merged or peft model works the same).
        rows: instruction rows with ``answer`` and ``Answer format: a/b/...`` in the instruction.
        tokenizer: the model's tokenizer (left padding is used for the batch).

    Returns ``accuracy``, ``answered`` (the share with an allowed answer found), and per row
    ``responses`` and ``predictions`` (``None`` where no answer was found).
    """
    if not rows:
        raise ValueError("generate_answers needs at least one row")
    network = getattr(model, "network", model)
    was_training = network.training
    network.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    responses = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = tokenizer([format_instruction(dict(r)) for r in chunk], return_tensors="pt", padding=True)
            inputs = {k: v.to(next(network.parameters()).device) for k, v in inputs.items()
                      if k in ("input_ids", "attention_mask")}
            out = network.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
            responses += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        network.train(was_training)
    predictions, correct = [], 0
    for row, response in zip(rows, responses):
        match = ANSWER_FORMAT.search(row.get("instruction", ""))
        if match is None or row.get("answer") is None:
            raise ValueError("each row needs 'Answer format: a/b/...' in its instruction and an 'answer'")
        prediction = extract_answer(response, match.group(1).split("/"))
        predictions.append(prediction)
        correct += prediction == str(row["answer"])
    answered = sum(p is not None for p in predictions)
    return {"accuracy": correct / len(rows), "answered": answered / len(rows), "responses": responses,
            "predictions": predictions}
