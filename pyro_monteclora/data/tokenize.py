"""Turn user data into tokenized examples and padded batches for classification or causal LM.

Accepted data: a ``datasets.Dataset``, a ``DatasetDict`` (``train`` split, plus ``validation``
or ``test`` for evaluation), a list of dicts, or the path of a local JSON / JSONL / CSV file
(read by :mod:`pyro_monteclora.data.files`, whose errors name the file and the line).

- classification: columns ``text`` and ``label`` (an int in ``[0, num_labels)``, or a string
  in the model's ``label2id``); a ``text_pair`` column is passed as the second segment. The
  classes are the model's: the rows need not hold every class, so data of a single class
  trains the model's ``num_labels``-class head (the CLI, which infers the classes from the
  labels, refuses a single class).
- causal LM: ``instruction``/``input``/``output`` (the format of the paper's commonsense and
  math sets, with the Alpaca prompt they were trained with), ``prompt``/``completion``, or chat
  ``messages`` (a list of ``{"role", "content"}``; the last message is the target), or
  multiple-choice rows ``question``/``choices``/``label`` (:mod:`pyro_monteclora.data.choices`),
  trained by SFT on the right continuation in lm-eval's context (``"Question: q\nAnswer:"`` ->
  ``" " + the right choice`` + EOS). Only the target tokens are scored: prompt and padding labels
  are ``IGNORE_INDEX``.

Example:
    >>> from pyro_monteclora.data import format_instruction
    >>> format_instruction({"instruction": "Add 2 and 3.", "input": ""})[-14:]
    '### Response:\\n'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from datasets import Dataset, DatasetDict

import pyro_monteclora.data.choices as choice_rows
from .files import DataLike, load_data
from ..models.likelihood import IGNORE_INDEX

__all__ = [
    "load_data",
    "split_data",
    "tokenize_classification",
    "tokenize_causal_lm",
    "Collator",
    "batches",
    "encode_texts",
    "encode_prompt_completion",
    "encode_context_continuation",
    "pad_token_id",
    "format_instruction",
    "DataLike",
]

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
EVAL_SPLITS = ("validation", "test", "eval")


def split_data(
    data: Union[Dataset, DatasetDict], eval_data: Optional[Union[Dataset, DatasetDict]] = None
) -> tuple[Dataset, Optional[Dataset]]:
    """The training split and the evaluation split (``validation``/``test``/``eval``) if any."""
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise ValueError(f"a DatasetDict needs a 'train' split, got splits {sorted(data)}")
        train = data["train"]
        if eval_data is None:
            eval_data = next((data[s] for s in EVAL_SPLITS if s in data), None)
    else:
        train = data
    if isinstance(eval_data, DatasetDict):
        eval_data = next((eval_data[s] for s in EVAL_SPLITS if s in eval_data), None)
    if len(train) == 0:
        raise ValueError("the training dataset is empty: it needs at least one example")
    return train, eval_data


def _require_columns(data: Dataset, any_of: list[tuple[str, ...]], task: str) -> tuple[str, ...]:
    for columns in any_of:
        if all(c in data.column_names for c in columns):
            return columns
    wanted = " or ".join("/".join(c) for c in any_of)
    raise ValueError(f"{task} data needs columns {wanted}; the dataset has columns {data.column_names}")


def tokenize_classification(
    data: Dataset, tokenizer: Any, max_length: int, num_labels: int, label2id: Optional[dict] = None
) -> list[dict[str, list[int]]]:
    """Tokenized examples ``{"input_ids", ..., "label"}``; checks labels against ``num_labels``."""
    if len(data) == 0:
        raise ValueError("the dataset is empty: it needs at least one example")
    _require_columns(data, [("text", "label")], "classification")
    _check_texts(data, [c for c in ("text", "text_pair") if c in data.column_names])
    labels = [_label_id(v, num_labels, label2id, row) for row, v in enumerate(data["label"])]
    pairs = list(data["text_pair"]) if "text_pair" in data.column_names else None
    encoded = encode_texts(tokenizer, list(data["text"]), pairs, max_length)
    return [{**example, "label": label} for example, label in zip(encoded, labels)]


def encode_texts(
    tokenizer: Any, texts: list[str], pairs: Optional[list[str]], max_length: int
) -> list[dict[str, list[int]]]:
    """Tokenize texts (and optional second segments) into per-example model inputs."""
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in encoded.keys() if k in ("input_ids", "attention_mask", "token_type_ids")]
    return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the pad token, else the eos token."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def _label_id(value: Any, num_labels: int, label2id: Optional[dict], row: int) -> int:
    """The class index of the label in (0-based) ``row``; errors name the row 1-based and the type."""
    where = f"the label in row {row + 1}"
    if isinstance(value, str):
        if label2id and value in label2id:
            return int(label2id[value])
        raise ValueError(
            f"{where} is the string {value!r}, not in the model's label2id {label2id}; "
            "use integer labels in [0, num_labels) or set model.config.label2id"
        )
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{where} is missing (empty, null or NaN); every row needs an integer label in [0, {num_labels})")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{where} is a {type(value).__name__} ({value!r}); labels must be integers in [0, {num_labels}) "
            "or strings in the model's label2id"
        )
    if not 0 <= value < num_labels:
        raise ValueError(
            f"{where} is {value}, out of range for a model with num_labels={num_labels}: labels must be integers "
            f"in [0, {num_labels}); load the model with num_labels set to the number of classes"
        )
    return value


def _check_texts(data: Dataset, columns: Sequence[str]) -> None:
    """Every value of the text columns is a string (an empty one is allowed)."""
    for column in columns:
        for row, value in enumerate(data[column]):
            if not isinstance(value, str):
                raise ValueError(
                    f"column {column!r} in row {row + 1} is {'missing' if value is None else 'a ' + type(value).__name__} "
                    f"({value!r}); it must be text"
                )


def format_instruction(row: dict) -> str:
    """The Alpaca prompt used for the paper's instruction-format data."""
    template = PROMPT_WITH_INPUT if row.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input", ""))


def _prompt_and_target(row: dict, columns: tuple[str, ...], tokenizer: Any) -> tuple[str, str]:
    if columns == ("instruction", "output"):
        return format_instruction(row), row["output"]
    if columns == ("prompt", "completion"):
        return row["prompt"], row["completion"]
    messages = row["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("each 'messages' list must end with the assistant message to learn")
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    else:
        prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages[:-1]) + "<|assistant|>\n"
    return prompt, messages[-1]["content"]


def tokenize_causal_lm(data: Dataset, tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenized ``{"input_ids", "attention_mask", "labels"}`` with prompt labels ignored.

    Examples whose target is cut off entirely by ``max_length`` are dropped; if none remains,
    ``ValueError`` says so.
    """
    if len(data) == 0:
        raise ValueError("the dataset is empty: it needs at least one example")
    if choice_rows.is_choice_data(data.column_names):  # SFT on the right continuation, in lm-eval's context
        rows = choice_rows.check_choice_rows(data)
        return _keep_targets(encode_prompt_completion(
            tokenizer, [choice_rows.context(r) for r in rows], [choice_rows.continuations(r)[r["label"]] for r in rows]),
            max_length)
    columns = _require_columns(
        data, [("instruction", "output"), ("prompt", "completion"), ("messages",)], "causal LM"
    )
    if columns != ("messages",):
        _check_texts(data, columns)
    pairs = [_prompt_and_target(row, columns, tokenizer) for row in data]
    return _keep_targets(encode_prompt_completion(tokenizer, [p for p, _ in pairs], [t for _, t in pairs]), max_length)


def _keep_targets(encoded: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """The examples cut to ``max_length``, without those whose target was cut off entirely."""
    examples = []
    for example in encoded:
        example = {key: values[:max_length] for key, values in example.items()}
        if any(label != IGNORE_INDEX for label in example["labels"][1:]):
            examples.append(example)
    if not examples:
        raise ValueError(
            f"no example keeps any target token within max_length={max_length}; raise max_length"
        )
    return examples


def encode_prompt_completion(
    tokenizer: Any, prompts: list[str], completions: list[str], append_eos: bool = True
) -> list[dict[str, list[int]]]:
    """``input_ids`` = prompt + completion (+ eos), ``labels`` = ``IGNORE_INDEX`` on the prompt.

    The prompt gets the tokenizer's special tokens, the completion none; eos (if the tokenizer
    has one and ``append_eos``) ends the scored part, so a model learns to stop.
    """
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    target_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    examples = []
    for prompt, target in zip(prompt_ids, target_ids):
        ids = prompt + target + eos
        labels = [IGNORE_INDEX] * len(prompt) + target + eos
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


def encode_context_continuation(
    tokenizer: Any,
    contexts: Sequence[str],
    continuations: Sequence[str],
    add_special_tokens: Optional[bool] = None,
    prefix_token_id: Optional[int] = None,
) -> list[dict[str, list[int]]]:
    """Scored examples tokenized as lm-evaluation-harness (0.4.x ``HFLM``) tokenizes a ``loglikelihood`` request.

    As lm-eval's ``_encode_pair``: trailing spaces of the context move to the start of the
    continuation; ``context + continuation`` is encoded whole and split after the context's own
    tokens. Special tokens follow the tokenizer's default (a Llama tokenizer puts BOS in the
    context, never scored), as lm-eval's ``add_bos_token=None``; ``add_special_tokens`` forces
    them on or off. An empty context becomes ``[prefix_token_id]`` (default: bos, else eos).
    ``labels`` are ``IGNORE_INDEX`` on the context, the token ids on the continuation.

    Example:
        >>> from pyro_monteclora.testing import CharTokenizer
        >>> example = encode_context_continuation(CharTokenizer(), ["Q: a? "], ["b"])[0]
        >>> example["input_ids"], example["labels"]     # bos, "Q: a?", then " b" scored
        ([1, 24, 61, 35, 40, 6, 35, 41], [-100, -100, -100, -100, -100, -100, 35, 41])
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"got {len(contexts)} contexts but {len(continuations)} continuations")
    special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    prefix = prefix_token_id
    if prefix is None:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pairs = []
    for context, continuation in zip(contexts, continuations):
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not continuation:
            raise ValueError(f"an empty continuation has nothing to score (context {context[-40:]!r})")
        pairs.append((context, continuation))

    def encode(texts: list[str], **kwargs: Any) -> list[list[int]]:
        return tokenizer(texts, **kwargs)["input_ids"] if texts else []

    wholes = iter(encode([c + x for c, x in pairs if c], **special))
    context_lengths = iter(len(ids) for ids in encode([c for c, _ in pairs if c], **special))
    bare = iter(encode([x for c, x in pairs if not c], add_special_tokens=False))
    examples = []
    for context, continuation in pairs:
        if context:
            whole = next(wholes)
            context_ids = whole[: next(context_lengths)]
            continuation_ids = whole[len(context_ids):]
        else:  # lm-eval: the prefix token is the context, unless the continuation starts with it
            continuation_ids = next(bare)
            if prefix is None:
                raise ValueError("an empty context needs a prefix token: the tokenizer has no bos or eos token")
            if continuation_ids and continuation_ids[0] == prefix:
                context_ids, continuation_ids = continuation_ids[:1], continuation_ids[1:]
            else:
                context_ids = [prefix]
        if not continuation_ids:
            raise ValueError(f"the continuation {continuation!r} has no tokens of its own after the context")
        ids = context_ids + continuation_ids
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * len(context_ids) + continuation_ids})
    return examples


@dataclass
class Collator:
    """Pads tokenized examples into a batch; adds ``index`` (dataset positions) for the data plate."""

    pad_token_id: int

    def __call__(self, items: list[tuple[int, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        indices, examples = zip(*items)
        length = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, torch.Tensor] = {"index": torch.tensor(indices)}
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}
        for key, pad in pads.items():
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] + [pad] * (length - len(e[key])) for e in examples])
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch


def batches(examples: list[dict[str, Any]], pad_id: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of ``batch_size`` tokenized examples, in order (with their ``index``)."""
    collate = Collator(pad_id)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield collate(list(enumerate(chunk, start)))


class IndexedExamples(torch.utils.data.Dataset):
    """A list of tokenized examples that yields ``(position, example)``."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        return index, self.examples[index]
