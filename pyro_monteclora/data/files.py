"""Read user data into a ``datasets.Dataset``: local JSON, JSON Lines and CSV files, or lists of rows.

Files are parsed here rather than by ``datasets``' builders, so that every error names the file,
the 1-based line (or row) and what is wrong, in one line; a column holds one type, as a table
needs. Import :func:`load_data` from :mod:`pyro_monteclora.data`.

Example:
    >>> import os, tempfile
    >>> from pyro_monteclora.data.files import load_data
    >>> path = os.path.join(tempfile.mkdtemp(), "train.jsonl")
    >>> _ = open(path, "w").write('{"text": "good", "label": 1}\\n{"text": "bad", "label": 0}\\n')
    >>> load_data(path).to_list()
    [{'text': 'good', 'label': 1}, {'text': 'bad', 'label': 0}]
    >>> _ = open(path, "w").write('{"text": "good", "label": 1}\\n{"text": "bad", label: 0}\\n')
    >>> load_data(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ...train.jsonl, line 2: invalid JSON (Expecting property name enclosed in double quotes, column 17)
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence, Union

from datasets import Dataset, DatasetDict

__all__ = ["load_data", "read_rows", "DataLike", "TEXT_COLUMNS"]

DataLike = Union[Dataset, DatasetDict, str, os.PathLike, Sequence[dict]]


def load_data(data: DataLike) -> Union[Dataset, DatasetDict]:
    """A ``Dataset``/``DatasetDict`` from any accepted form; local files only, no hub access.

    A file that cannot be read raises one ``ValueError`` naming the file, the 1-based line and
    what is wrong (invalid JSON, not UTF-8, an unclosed CSV quote, a ragged CSV row, ...); so
    does a file without rows.
    JSON may be a list of rows, one object per line (JSON Lines) or columns (an object of
    equal-length lists).
    """
    if isinstance(data, (Dataset, DatasetDict)):
        return data
    if isinstance(data, (str, os.PathLike)):
        return _from_rows(read_rows(data), os.fspath(data))
    if isinstance(data, Sequence) and all(isinstance(row, dict) for row in data):
        return _from_rows(list(data), "the data")
    raise TypeError(f"data must be a Dataset, DatasetDict, list of dicts or file path, got {type(data).__name__}")


def read_rows(path: Union[str, os.PathLike]) -> list[dict]:
    """The rows of a local JSON, JSON Lines or CSV file as plain dicts (no table is built).

    Errors name the file, the 1-based line and what is wrong; a file without rows is refused.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".json", ".jsonl", ".csv"):
        raise ValueError(f"cannot read {path!r}: use a .json, .jsonl or .csv file, or a datasets.Dataset")
    lines = _text_lines(path)
    rows = _csv_rows(path, lines) if extension == ".csv" else _json_rows(path, lines)
    if not rows:
        raise ValueError(f"{path} is empty: a data file needs at least one row")
    return rows


def _text_lines(path: str) -> list[str]:
    with open(path, "rb") as handle:
        raw = handle.read().split(b"\n")
    lines = []
    for number, line in enumerate(raw, 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path}, line {number}: not valid UTF-8 (byte {line[error.start]:#04x} at column "
                f"{error.start + 1}); save the file as UTF-8"
            ) from None
    return lines


def _json_rows(path: str, lines: list[str]) -> list[dict]:
    text = "\n".join(lines)
    if not text.strip():
        return []
    if not _looks_like_jsonl(lines):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
        if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
            sizes = {k: len(v) for k, v in value.items()}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"{path}: the columns have different lengths {sizes}; each needs one value per row")
            return [dict(zip(value, row)) for row in zip(*value.values())]  # column-oriented JSON
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list of objects (rows), got a JSON {type(value).__name__}")
        for index, row in enumerate(value, 1):
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {index} is a JSON {type(row).__name__}, not an object with named columns")
        return value
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object with named columns")
        rows.append(row)
    return rows


def _looks_like_jsonl(lines: list[str]) -> bool:
    """Several non-blank lines, the first a complete JSON object: JSON Lines."""
    filled = [line for line in lines if line.strip()]
    if len(filled) < 2 or not filled[0].lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(filled[0]), dict)
    except json.JSONDecodeError:
        return False


def _csv_rows(path: str, lines: list[str]) -> list[dict]:
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path} is empty: a CSV file needs a header line and at least one row")
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
        rows = []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}, line {reader.line_num}: {len(cells)} cells, but the header has {len(header)} columns {header}"
                )
            rows.append(dict(zip(header, cells)))
    except csv.Error as error:
        raise ValueError(f"{path}, line {reader.line_num}: invalid CSV ({error}); check for an unclosed quote") from None
    for column in header:  # numbers as numbers, as a typed CSV reader gives them; empty cells are missing
        values = [row[column] for row in rows]
        for kind in (int, float, str):
            try:
                converted = [kind(v) if v != "" else None for v in values]
            except ValueError:
                continue
            for row, value in zip(rows, converted):
                row[column] = value
            break
    return rows


TEXT_COLUMNS = ("text", "text_pair", "instruction", "input", "output", "prompt", "completion")


def _check_column_types(rows: list[dict], where: str) -> None:
    """One type per column, as a table needs: a mixed column raises ``ValueError`` naming the row.

    Text columns must hold strings; labels must be all integers or all strings (a float label
    is named, since a table would silently turn the integers of its column into floats too).
    Missing values (``None``) are left to the task's own checks, which name them.
    """
    columns: dict[str, list[tuple[int, Any]]] = {}
    for number, row in enumerate(rows, 1):
        for key, value in row.items():
            if key == "label" and isinstance(value, float) and math.isnan(value):
                raise ValueError(f"{where}: the label in row {number} is missing (NaN); every row needs a label")
            if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
                raise ValueError(f"{where}: column {key!r} in row {number} holds {value}, too large for a 64-bit table column")
            if value is not None:
                columns.setdefault(key, []).append((number, value))
    for column, values in columns.items():
        kinds = {_kind(v) for _, v in values}
        if column in TEXT_COLUMNS and kinds != {"str"}:
            number, value = next((n, v) for n, v in values if not isinstance(v, str))
            raise ValueError(f"{where}: column {column!r} in row {number} is a {type(value).__name__} ({value!r}); it must be text")
        if column == "label" and "float" in kinds:
            number, value = next((n, v) for n, v in values if _kind(v) == "float")
            raise ValueError(
                f"{where}: the label in row {number} is a float ({value!r}); labels must be integers or strings"
            )
        if kinds == {"int", "float"} and column != "label":
            continue  # numbers: a table stores them as floats, as pyarrow does
        if len(kinds) > 1:
            (first, a), (number, b) = values[0], next((n, v) for n, v in values if _kind(v) != _kind(values[0][1]))
            rule = "labels must be all integers or all strings" if column == "label" else "a column holds one type"
            raise ValueError(
                f"{where}: column {column!r} mixes types: row {first} is a {type(a).__name__} ({a!r}), "
                f"row {number} a {type(b).__name__} ({b!r}); {rule}"
            )


def _kind(value: Any) -> str:
    return "float" if isinstance(value, float) else type(value).__name__


def _from_rows(rows: list[dict], path: str) -> Dataset:
    if not rows:
        return Dataset.from_list([])
    _check_column_types(rows, path)
    columns = list(dict.fromkeys(k for row in rows for k in row))  # from_list keeps the first row's columns only
    rows = [{k: row.get(k) for k in columns} for row in rows]  # a value missing from a row is None, named later
    try:
        return Dataset.from_list(rows)
    except (TypeError, ValueError, OverflowError) as error:  # pyarrow cannot type a mixed column (ArrowInvalid, ...)
        reason = " ".join(str(error).split())[:160]
        raise ValueError(f"{path}: a column mixes values of different types ({reason})") from None

