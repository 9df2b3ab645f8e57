"""Multiple-choice rows as training examples of the multiple-choice likelihood, and their batches.

With ``task="multiple_choice"`` a row ``{"question", "choices", "label"}`` becomes one example: each
choice tokenized as lm-evaluation-harness tokenizes its request (context ``"Question: q\\nAnswer:"``,
continuation ``" choice"``, :func:`~pyro_monteclora.data.tokenize.encode_context_continuation`),
the label and the choices' lengths in characters. :func:`collate_choices` pads a batch of them to
the tensors of :func:`pyro_monteclora.models.choices.choice_batch`: each row's shared prompt once,
its choices beside it, rows with fewer choices padded with absent ones (probability zero).

Example:
    >>> from pyro_monteclora.testing import CharTokenizer
    >>> rows = [{"question": "Sky?", "choices": ["red", "blue"], "label": 1},
    ...         {"question": "Ice?", "choices": ["cold", "hot", "warm"], "label": 0}]
    >>> examples = tokenize_multiple_choice(rows, CharTokenizer(), max_length=64)
    >>> batch = collate_choices(list(enumerate(examples)), pad_id=0)
    >>> batch["choice_ids"].shape[:2], batch["choice_present"].tolist()
    (torch.Size([2, 3]), [[True, True, False], [True, True, True]])
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..models.choices import choice_batch, shared_length
from ..models.likelihood import IGNORE_INDEX
from . import choices as choice_rows
from .tokenize import encode_context_continuation

__all__ = ["tokenize_multiple_choice", "collate_choices", "is_choice_example"]


def is_choice_example(example: dict[str, Any]) -> bool:
    """Whether a tokenized example is a multiple-choice one (from :func:`tokenize_multiple_choice`)."""
    return "choices" in example and "choice_lengths" in example


def tokenize_multiple_choice(data: Iterable[Any], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """One example per row: ``choices`` (each ``input_ids``/``labels``), ``label``, ``choice_lengths``.

    A sequence longer than ``max_length`` loses tokens from the left of its context, as lm-eval
    truncates; a choice whose own tokens do not fit is an error naming the row.
    """
    columns = getattr(data, "column_names", None)
    if columns is not None and not choice_rows.is_choice_data(columns):
        raise ValueError(
            f"task='multiple_choice' trains on rows with question (or prompt), choices and label; the dataset has "
            f"columns {columns}. For prompt/completion, instruction or messages rows use task='causal_lm' (or 'auto')"
        )
    rows = choice_rows.check_choice_rows(data)
    contexts = [choice_rows.context(row) for row in rows for _ in row["choices"]]
    encoded = iter(encode_context_continuation(
        tokenizer, contexts, [c for row in rows for c in choice_rows.continuations(row)]))
    examples = []
    for index, row in enumerate(rows):
        choices = [_fit(next(encoded), max_length, index) for _ in row["choices"]]
        examples.append({"choices": choices, "label": int(row["label"]),
                         "choice_lengths": [float(len(choice)) for choice in row["choices"]]})
    return examples


def _fit(example: dict[str, list[int]], max_length: int, row: int) -> dict[str, list[int]]:
    ids, labels = example["input_ids"], example["labels"]
    scored = sum(label != IGNORE_INDEX for label in labels)
    if scored >= max_length:
        raise ValueError(
            f"row {row}: a choice has {scored} tokens, which leaves no context within max_length={max_length}; "
            "raise max_length"
        )
    return {"input_ids": ids[-max_length:], "labels": labels[-max_length:]}


def collate_choices(items: Sequence[tuple[int, dict[str, Any]]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of ``(dataset position, example)`` pairs as the multiple-choice likelihood's tensors."""
    indices, examples = zip(*items)
    counts = [len(example["choices"]) for example in examples]
    k = max(counts)
    groups = [example["choices"] + [example["choices"][-1]] * (k - len(example["choices"])) for example in examples]
    batch = choice_batch(groups, [shared_length([c["input_ids"] for c in group]) for group in groups], pad_id)
    batch["choice_present"] = torch.arange(k)[None, :] < torch.tensor(counts)[:, None]
    batch["choice_lengths"] = torch.tensor([e["choice_lengths"] + [1.0] * (k - len(e["choice_lengths"]))
                                            for e in examples])
    batch["labels"] = torch.tensor([example["label"] for example in examples])
    batch["index"] = torch.tensor(indices)
    return batch
