"""Data in, tensors out: local files and rows (:mod:`.files`), tokenization and batches (:mod:`.tokenize`).

Example:
    >>> from pyro_monteclora.data import load_data
    >>> load_data([{"text": "good", "label": 1}, {"text": "bad", "label": 0}]).num_rows
    2
"""

from .files import TEXT_COLUMNS, DataLike, load_data
from .tokenize import (
    Collator,
    batches,
    IndexedExamples,
    encode_prompt_completion,
    encode_texts,
    format_instruction,
    pad_token_id,
    split_data,
    tokenize_causal_lm,
    tokenize_classification,
)

__all__ = [
    "load_data",
    "split_data",
    "DataLike",
    "TEXT_COLUMNS",
    "tokenize_classification",
    "tokenize_causal_lm",
    "Collator",
    "batches",
    "IndexedExamples",
    "encode_texts",
    "encode_prompt_completion",
    "pad_token_id",
    "format_instruction",
]
