"""Shared fixtures: fixed seeds, an empty Pyro param store, validation on, tiny tokenizers."""

from __future__ import annotations

import os
import signal

import pyro
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")

from pyro_monteclora.testing import TOY_WORDS as WORDS
from pyro_monteclora.testing import toy_tokenizer


@pytest.fixture(autouse=True)
def _clean_pyro():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    torch.manual_seed(0)
    yield
    assert not list(pyro.get_param_store().keys()), "a test leaked parameters into Pyro's global param store"


@pytest.fixture
def interruptible():
    """Ctrl-C raises ``KeyboardInterrupt`` in this test, even when pytest was started with SIGINT ignored.

    A background job, ``nohup`` or some CI runners start the suite with SIGINT ignored; a test
    that interrupts itself installs Python's own handler first, and the previous one comes back.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer over a 16-token vocabulary (no hub access)."""
    return toy_tokenizer(WORDS, str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from pyro_monteclora.examples import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())
