"""Quiet library output around our calls, scoped: every setting is put back on exit.

transformers (its load report of missing head weights, deprecation notes), datasets ("Generating
train split" bars) and peft print a lot around what the user asked for. :func:`quiet` lowers
their log levels and turns their progress bars off for the duration of a block, using each
library's own controls, and restores the previous settings on exit, exception or not. With
``verbose=True`` it changes nothing. :func:`new_head_note` replaces transformers' load report
of a freshly initialized classification head with one short line.

Example:
    >>> import logging
    >>> from transformers.utils import logging as hf_logging
    >>> before = hf_logging.get_verbosity()
    >>> with quiet():
    ...     hf_logging.get_verbosity() == logging.ERROR
    True
    >>> hf_logging.get_verbosity() == before
    True
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator, Optional, Sequence

__all__ = ["quiet", "new_head_note", "LOGGERS"]

#: Python loggers lowered to ERROR inside :func:`quiet` (transformers' and datasets' have their own switches too).
LOGGERS = ("peft", "pyro", "accelerate", "torch.distributed", "huggingface_hub")


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Silence transformers, datasets, peft, accelerate and Pyro logs and progress bars in the block."""
    if verbose:
        yield
        return
    import datasets
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    hf_verbosity = hf_logging.get_verbosity()
    hf_bars = hf_logging.is_progress_bar_enabled()
    datasets_verbosity = datasets_logging.get_verbosity()
    datasets_bars = datasets.is_progress_bar_enabled()
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    try:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        datasets_logging.set_verbosity_error()
        datasets.disable_progress_bars()
        for name in LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            yield
    finally:
        hf_logging.set_verbosity(hf_verbosity)
        (hf_logging.enable_progress_bar if hf_bars else hf_logging.disable_progress_bar)()
        datasets_logging.set_verbosity(datasets_verbosity)
        (datasets.enable_progress_bars if datasets_bars else datasets.disable_progress_bars)()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")


def new_head_note(missing_keys: Sequence[str], num_labels: Optional[int]) -> Optional[str]:
    """One line saying that a new classification head was initialized, if the missing weights are a head's.

    Example:
        >>> new_head_note(["classifier.weight", "classifier.bias"], 2)
        'a new 2-class head was initialized (classifier)'
        >>> new_head_note([], 2) is None
        True
    """
    heads = sorted({key.split(".")[0] for key in missing_keys if key.split(".")[0] in HEAD_NAMES})
    if not heads:
        return None
    classes = f"{num_labels}-class " if num_labels else ""
    return f"a new {classes}head was initialized ({', '.join(heads)})"
