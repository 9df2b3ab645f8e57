"""What the ``pyro-monteclora`` commands read and write: data, labels, models and output targets.

Data comes from a file, a folder or a hub id; classification labels become classes (printed
once on stderr); models load from a folder, a hub id or the packaged ones; every output path
follows one rule (:func:`writable_target`), checked before any work.

Example:
    >>> from datasets import Dataset
    >>> from pyro_monteclora.cli.inputs import class_labels
    >>> class_labels(Dataset.from_list([{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]), None)
    (2, {0: 'neg', 1: 'pos'})
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

__all__ = [
    "load_data_arg",
    "class_labels",
    "writable_target",
    "load_tokenizer",
    "base_model_path",
    "is_smollm2",
    "load_monteclora",
    "load_gguf",
    "DATA_EXTENSIONS",
]

DATA_EXTENSIONS = (".jsonl", ".json", ".csv")


def load_data_arg(spec: str) -> Any:
    """A ``Dataset``/``DatasetDict`` from a file, a folder or (where the network works) a hub id."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    from ..data.tokenize import load_data

    if os.path.isfile(spec):
        return load_data(spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "dataset_dict.json")) or os.path.isfile(os.path.join(spec, "state.json")):
            return load_from_disk(spec)
        splits = {}
        for split in ("train", "validation", "test", "eval"):
            for extension in DATA_EXTENSIONS:
                path = os.path.join(spec, split + extension)
                if os.path.isfile(path):
                    splits[split] = load_data(path)
                    break
        if not splits:
            raise FileNotFoundError(
                f"no data in folder {spec!r}: expected train/validation/test .jsonl/.json/.csv files "
                "or a datasets.save_to_disk folder"
            )
        return DatasetDict(splits)
    if os.path.sep in spec or spec.endswith(DATA_EXTENSIONS):
        raise FileNotFoundError(f"data {spec!r} does not exist")
    return load_dataset(spec)


def class_labels(
    data: Any, num_labels: Optional[int], source: str = "the data"
) -> tuple[Optional[int], Optional[dict[int, str]]]:
    """The classes of the training labels: their count and names (printed once on stderr).

    String labels become classes 0..K-1 in sorted order; integer labels must be 0..K-1 (or
    fit in ``--num-labels``); anything else is an error that names ``source`` and says what to
    fix (a missing label: its 1-based row).
    """
    from datasets import DatasetDict

    split = data["train"] if isinstance(data, DatasetDict) and "train" in data else data
    if isinstance(split, DatasetDict):
        split = next(iter(split.values()))
    if "label" not in split.column_names:
        return num_labels, None
    feature = split.features["label"]
    if getattr(feature, "names", None):
        names = dict(enumerate(feature.names))
    else:
        labels = list(split["label"])
        if None in labels:
            raise ValueError(
                f"{source}: the label in row {labels.index(None) + 1} is missing (an empty cell or null); "
                "every row needs a label"
            )
        values = set(labels)
        if all(isinstance(v, str) for v in values):
            names = dict(enumerate(sorted(values)))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            top = max(values)
            count = num_labels if num_labels is not None else top + 1
            if min(values) < 0 or top >= count:
                row = next(i for i, v in enumerate(labels, 1) if v < 0 or v >= count)
                raise ValueError(
                    f"{source}: the label in row {row} ({labels[row - 1]}) is out of range: integer labels must lie "
                    f"in [0, {count}); the data has {sorted(values)[:10]}"
                )
            if num_labels is None and len(values) != count:
                missing = sorted(set(range(count)) - values)
                raise ValueError(
                    f"{source}: the integer labels {sorted(values)[:10]} skip class(es) {missing[:10]}: renumber "
                    f"them 0..K-1, or pass --num-labels {count} to keep {count} classes"
                )
            names = {i: str(i) for i in range(count)}
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise ValueError(
                f"{source}: labels must be all integers or all strings; the 'label' column holds {', '.join(kinds)}"
            )
    if num_labels is not None and num_labels != len(names):
        raise ValueError(
            f"--num-labels {num_labels} does not match the {len(names)} label names {list(names.values())} of {source}"
        )
    if len(names) < 2:
        raise ValueError(f"{source} has a single class ({list(names.values())}): a classifier needs at least two")
    shown = ", ".join(names.values()) if len(names) <= 10 else ", ".join(list(names.values())[:10]) + ", ..."
    print(f"classification: {len(names)} classes: {shown}", file=sys.stderr)
    return len(names), names


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a model folder (local files only) or hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))


def base_model_path(args: argparse.Namespace) -> str:
    """``--base-model``, else the base model recorded in the adapter."""
    from ..io import read_metadata

    if args.base_model:
        return args.base_model
    recorded = read_metadata(args.adapter_path).get("base_model_name_or_path")
    if not recorded:
        raise ValueError("the adapter does not record its base model: pass --base-model")
    return recorded


def is_smollm2(path: str) -> bool:
    """Whether ``path`` names the packaged SmolLM2 (``smollm2`` or its GGUF-only folder)."""
    from ..examples import SMOLLM2_FILE

    return path == "smollm2" or (
        os.path.isfile(os.path.join(path, SMOLLM2_FILE)) and not os.path.isfile(os.path.join(path, "config.json"))
    )


def load_monteclora(args: argparse.Namespace) -> Any:
    """The saved adapter of ``--adapter-path`` restored on its base model."""
    from ..monteclora import load

    path = base_model_path(args)
    if is_smollm2(path):
        from ..examples import load_smollm2

        model, tokenizer = load_smollm2()
        return load(model, args.adapter_path, tokenizer=tokenizer)
    return load(path, args.adapter_path)


def writable_target(path: str, overwrite: bool, kind: str = "folder") -> str:
    """The one rule of every writer: an existing file or non-empty folder is replaced only with
    ``--overwrite``, and never by the other kind (``kind``: ``"folder"`` or ``"file"``); missing
    parent folders are created. Checked (with a real write, :func:`~pyro_monteclora.io.atomic.check_writable`)
    before any work."""
    from ..io.atomic import check_writable

    path = os.path.abspath(path)
    if os.path.exists(path) and (os.path.isfile(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or choose another path")
    check_writable(path, overwrite, kind)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def load_gguf(model_path: str, gguf_file: Optional[str]) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from a GGUF file (dequantized), or the packaged SmolLM2."""
    from ..examples import load_gguf as load_gguf_file, load_smollm2

    if gguf_file is None or model_path == "smollm2":
        return load_smollm2()
    if not os.path.isfile(os.path.join(model_path, gguf_file)):
        raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {model_path!r}")
    return load_gguf_file(model_path, gguf_file)

