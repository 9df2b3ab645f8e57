"""Quiet library output around our calls, scoped: every setting is put back on exit.

transformers (its load report of missing head weights, deprecation notes), datasets ("Generating
train split" bars) and peft print a lot around what the user asked for. :func:`quiet` lowers
their log levels and turns their progress bars off for the duration of a block, using each
library's own controls, and restores the previous settings on exit, exception or not (also
those a library changed inside the block). With ``verbose=True`` it lowers nothing. The choice
holds for the block: a nested ``quiet()`` (as in :func:`~pyro_monteclora.evaluate`,
:func:`~pyro_monteclora.predict` or the model loaders) follows the enclosing one, so
``--verbose`` reaches every library call of a command. :func:`new_head_note` replaces
transformers' load report of a freshly initialized classification head with one short line.

Example:
    >>> import logging
    >>> from transformers.utils import logging as hf_logging
    >>> before = hf_logging.get_verbosity()
    >>> with quiet():
    ...     hf_logging.get_verbosity() == logging.ERROR
    True
    >>> hf_logging.get_verbosity() == before
    True
    >>> with quiet(verbose=True), quiet():
    ...     hf_logging.get_verbosity() == before
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings
from typing import Iterator, Optional, Sequence

__all__ = ["quiet", "is_verbose", "new_head_note", "LOGGERS"]

#: Python loggers lowered to ERROR inside :func:`quiet` (transformers' and datasets' have their own switches too).
LOGGERS = ("peft", "pyro", "accelerate", "torch.distributed", "huggingface_hub")


_VERBOSE: contextvars.ContextVar[bool] = contextvars.ContextVar("pyro_monteclora_verbose", default=False)


def is_verbose(verbose: Optional[bool] = None) -> bool:
    """``verbose`` if given, else the choice of the enclosing :func:`quiet` block (quiet outside any)."""
    return _VERBOSE.get() if verbose is None else bool(verbose)


@contextlib.contextmanager
def quiet(verbose: Optional[bool] = None) -> Iterator[None]:
    """Silence transformers, datasets, peft, accelerate and Pyro logs and progress bars in the block.

    ``verbose=True`` lowers nothing; ``None`` (the default) follows the enclosing block. Either
    way the settings are put back on exit, also those a library changed inside the block (such
    as the log level that transformers' ``Trainer`` sets).
    """
    verbose = is_verbose(verbose)
    token = _VERBOSE.set(verbose)
    try:
        with _restored():
            if verbose:
                yield
            else:
                with _silenced():
                    yield
    finally:
        _VERBOSE.reset(token)


@contextlib.contextmanager
def _restored() -> Iterator[None]:
    """Put the libraries' log levels and progress-bar switches back as they were on entry."""
    import datasets
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    hf_verbosity = hf_logging.get_verbosity()
    hf_bars = hf_logging.is_progress_bar_enabled()
    datasets_verbosity = datasets_logging.get_verbosity()
    datasets_bars = datasets.is_progress_bar_enabled()
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    try:
        yield
    finally:
        hf_logging.set_verbosity(hf_verbosity)
        (hf_logging.enable_progress_bar if hf_bars else hf_logging.disable_progress_bar)()
        datasets_logging.set_verbosity(datasets_verbosity)
        (datasets.enable_progress_bars if datasets_bars else datasets.disable_progress_bars)()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Lower the log levels to ERROR, turn progress bars and FutureWarnings off (undone by :func:`_restored`)."""
    import datasets
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

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
