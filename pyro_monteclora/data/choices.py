"""Multiple-choice rows: ``{"question", "choices", "label"}`` (and an optional ``"prompt"``), scored like lm-eval.

A row is scored the way lm-evaluation-harness scores small LMs (ARC, PIQA, OpenBookQA, ...):
the context is ``"Question: {question}\\nAnswer:"`` (or the row's own ``prompt``), each
continuation is ``" " + choice`` (the target delimiter), nothing is appended (no EOS).
Rows may have different numbers of choices. :func:`instruction_to_choice_row` converts the
paper's instruction rows (``../shared/data/commonsense``: options ``Answer1:``/``Solution1:``/
``Option1:`` inside the instruction, ``Answer format: ...``; BoolQ's true/false as lm-eval's
no/yes), and every error names the row.

Example:
    >>> rows = check_choice_rows([{"question": "Is ice cold?", "choices": ["no", "yes"], "label": 1}])
    >>> context(rows[0]), continuations(rows[0])
    ('Question: Is ice cold?\\nAnswer:', [' no', ' yes'])
    >>> row = {"instruction": "Please choose the correct answer to the question: Ice is\\n\\n"
    ...        "Answer1: hot Answer2: cold\\n\\nAnswer format: answer1/answer2", "answer": "answer2"}
    >>> instruction_to_choice_row(row)
    {'question': 'Ice is', 'choices': ['hot', 'cold'], 'label': 1}
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence, Union

__all__ = [
    "CHOICE_COLUMNS",
    "DEFAULT_TEMPLATE",
    "TARGET_DELIMITER",
    "is_choice_data",
    "check_choice_rows",
    "context",
    "continuations",
    "instruction_to_choice_row",
    "load_choice_rows",
]

#: The columns that make a row a multiple-choice row.
CHOICE_COLUMNS = ("question", "choices", "label")
#: lm-eval's ARC / PIQA / OpenBookQA context.
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
#: lm-eval's ``target_delimiter``: put between the context and each choice.
TARGET_DELIMITER = " "

_OPTION = re.compile(r"(?:^|\s)(Answer|Solution|Option)(\d+):\s")
_FORMAT = re.compile(r"\n*\s*Answer format:\s*(\S+)\s*$")
_LEAD = re.compile(r"^Please [^:]*?(?:question|sentence|options?|statement)\s*:\s*", re.S)
_BOOL_LEAD = re.compile(r"^Please answer the following question with true or false, question:\s*", re.S)


def is_choice_data(columns: Iterable[str]) -> bool:
    """Whether rows with these columns are multiple-choice rows (``question``, ``choices``, ``label``)."""
    return set(CHOICE_COLUMNS) <= set(columns)


def _where(index: int, source: str) -> str:
    return f"{source}, row {index}"


def _check_row(row: Any, index: int, source: str) -> dict[str, Any]:
    where = _where(index, source)
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a multiple-choice row is a dict with 'question', 'choices', 'label', got {type(row).__name__}")
    missing = [c for c in CHOICE_COLUMNS if c not in row]
    if missing:
        raise ValueError(f"{where}: missing {missing} (a multiple-choice row has 'question', 'choices' and 'label')")
    question, choices, label = row["question"], row["choices"], row["label"]
    if not isinstance(question, str):
        raise ValueError(f"{where}: 'question' must be a string, got {question!r:.80}")
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of strings, got {choices!r:.80}")
    if len(choices) == 0:
        raise ValueError(f"{where}: 'choices' is empty; a multiple-choice row needs at least one choice")
    if any(not c.strip() for c in choices):
        raise ValueError(f"{where}: choice {[c.strip() for c in choices].index('')} is empty; every choice needs text")
    if isinstance(label, float) and math.isfinite(label) and label.is_integer():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: 'label' must be the integer index of the right choice, got {label!r:.40}")
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: label {label} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    out = {"question": question, "choices": list(choices), "label": label}
    if row.get("prompt") is not None:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string (it replaces the default context)")
        out["prompt"] = row["prompt"]
    return out


def check_choice_rows(rows: Iterable[Any], source: str = "the data") -> list[dict[str, Any]]:
    """Validated multiple-choice rows (plain dicts); one ``ValueError`` naming the first bad row.

    Instruction rows (``instruction``/``answer``) are converted by :func:`instruction_to_choice_row`.
    """
    out = []
    for index, row in enumerate(rows):
        if isinstance(row, Mapping) and "instruction" in row and "choices" not in row:
            row = instruction_to_choice_row(row, index, source)
        out.append(_check_row(row, index, source))
    if not out:
        raise ValueError(f"{source} has no multiple-choice rows")
    return out


def context(row: Mapping[str, Any]) -> str:
    """The context of a row: its ``prompt``, or ``"Question: {question}\\nAnswer:"``."""
    prompt = row.get("prompt")
    return prompt if prompt is not None else DEFAULT_TEMPLATE.format(question=row["question"])


def continuations(row: Mapping[str, Any]) -> list[str]:
    """The continuations of a row: ``" " + choice`` for each choice (no EOS)."""
    return [TARGET_DELIMITER + choice for choice in row["choices"]]


def instruction_to_choice_row(row: Mapping[str, Any], index: int = 0, source: str = "the data") -> dict[str, Any]:
    """A multiple-choice row from one of the paper's instruction rows (commonsense sets).

    Options ``Answer1: ... Answer2: ...`` (or ``Solution``/``Option``) become ``choices``, the
    row's ``answer`` (``answer2``) the ``label``; a true/false row (BoolQ) becomes lm-eval's
    ``["no", "yes"]``. The question is the instruction's text after its lead-in
    (``Please choose the correct answer to the question:``). Errors name the row.
    """
    where = _where(index, source)
    instruction, answer = row.get("instruction"), row.get("answer")
    if not isinstance(instruction, str) or not isinstance(answer, str):
        raise ValueError(f"{where}: an instruction row needs string 'instruction' and 'answer' fields")
    found = _FORMAT.search(instruction)
    if found is None:
        raise ValueError(f"{where}: no 'Answer format: a/b/...' at the end of the instruction: {instruction[-80:]!r}")
    allowed = found.group(1).split("/")
    body = instruction[: found.start()].strip()
    if answer.strip().lower() not in [a.lower() for a in allowed]:
        raise ValueError(f"{where}: answer {answer!r} is not among the allowed answers {allowed}")
    if [a.lower() for a in allowed] == ["true", "false"]:
        question = _BOOL_LEAD.sub("", body).strip()
        return {"question": question, "choices": ["no", "yes"], "label": int(answer.strip().lower() == "true")}
    options = list(_OPTION.finditer(body))
    if not options:
        raise ValueError(f"{where}: no options (Answer1: / Solution1: / Option1:) in the instruction: {body[:80]!r}")
    numbers = [int(m.group(2)) for m in options]
    if numbers != list(range(1, len(options) + 1)) or len(options) != len(allowed):
        raise ValueError(f"{where}: options numbered {numbers} do not match 'Answer format: {found.group(1)}'")
    choices = [body[m.end(): (options[i + 1].start() if i + 1 < len(options) else len(body))].strip()
               for i, m in enumerate(options)]
    question = _LEAD.sub("", body[: options[0].start()]).strip()
    label = [a.lower() for a in allowed].index(answer.strip().lower())
    return {"question": question, "choices": choices, "label": label}


def load_choice_rows(data: Union[str, os.PathLike, Iterable[Any]]) -> list[dict[str, Any]]:
    """Multiple-choice rows from a local JSON/JSONL file, a ``datasets.Dataset`` or a list of rows.

    Instruction rows (the paper's format) are converted; every row is validated.
    """
    if isinstance(data, (str, os.PathLike)):
        from .files import read_rows

        path = os.fspath(data)
        return check_choice_rows(read_rows(path), path)
    return check_choice_rows(data)
