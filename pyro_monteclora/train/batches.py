"""Tokenized examples as the dataset and collator of a ``Trainer``.

Examples are tokenized once, before training (not per epoch). Each item is a dict of the
model inputs, the label(s) and ``index``, the example's position in the training set (the
subsample of the ELBO's data plate).

Example:
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert, toy_tokenizer, toy_sentiment
    >>> mc = MonteCLoRA.from_model(tiny_bert(vocab_size=8), lora_r=4)
    >>> data, collate = examples_dataset(mc, toy_sentiment(4), toy_tokenizer(["the", "is", "good", "bad"]), 16)
    >>> sorted(collate([data[0], data[1]]))
    ['attention_mask', 'index', 'input_ids', 'labels', 'token_type_ids']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset

from ..config import MonteCLoRAConfig
from ..data.choice_examples import collate_choices, is_choice_example, tokenize_multiple_choice
from ..data.choices import is_choice_data
from ..data.tokenize import Collator, pad_token_id, tokenize_causal_lm, tokenize_classification
from ..monteclora import MonteCLoRA

__all__ = ["ExamplesDataset", "ExampleCollator", "examples_dataset", "tokenize_for", "with_likelihood"]


class ExamplesDataset(torch.utils.data.Dataset):
    """Tokenized examples; item ``i`` is the example's dict with ``index = i``."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.examples[index], "index": index}


@dataclass
class ExampleCollator:
    """Pads a list of :class:`ExamplesDataset` items into a batch (labels, ``index`` included)."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [(item["index"], item) for item in items]
        if is_choice_example(items[0]):  # task="multiple_choice": prompts and their choices
            return collate_choices(pairs, self.pad_token_id)
        return Collator(self.pad_token_id)(pairs)


def with_likelihood(config: MonteCLoRAConfig, monteclora: MonteCLoRA, data: Dataset) -> MonteCLoRAConfig:
    """``config`` with its task decided by the rows: under ``task="auto"`` a causal LM trains
    multiple-choice rows (``question``, ``choices``, ``label``) by the multiple-choice likelihood,
    the recommendation of ``benchmarks/results/arc.md``; ``task="causal_lm"`` keeps SFT on the right
    answer."""
    if config.task == "auto" and monteclora.task == "causal_lm" and is_choice_data(getattr(data, "column_names", [])):
        return config.replace(task="multiple_choice")
    return config


def tokenize_for(monteclora: MonteCLoRA, data: Dataset, tokenizer: Any, max_length: int) -> list[dict]:
    """Tokenize ``data`` for the model's task (classification labels checked against its head).

    With ``task="multiple_choice"`` (or multiple-choice rows under ``"auto"``, :func:`with_likelihood`),
    one example per row with its choices."""
    if with_likelihood(monteclora.monteclora_config, monteclora, data).task == "multiple_choice":
        return tokenize_multiple_choice(data, tokenizer, max_length)
    if monteclora.task == "classification":
        config = monteclora.network.config
        return tokenize_classification(data, tokenizer, max_length, config.num_labels, getattr(config, "label2id", None))
    return tokenize_causal_lm(data, tokenizer, max_length)


def examples_dataset(
    monteclora: MonteCLoRA, data: Any, tokenizer: Any, max_length: int
) -> tuple[ExamplesDataset, ExampleCollator]:
    """Tokenize ``data`` (any form :func:`pyro_monteclora.data.load_data` accepts) once."""
    from ..data.tokenize import load_data

    examples = tokenize_for(monteclora, load_data(data), tokenizer, max_length)
    return ExamplesDataset(examples), ExampleCollator(pad_token_id(tokenizer))
