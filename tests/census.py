"""Shared pieces of the bad-input census (``tests/test_bad_input.py``: data, configuration, models
and adapters going in; ``tests/test_bad_outputs.py``: runs, output folders and saves coming out).

Every error is checked through :func:`_one_line_error` (CLI: one line on stderr, exit code 1, no
traceback) or :func:`_api_error` (Python API), so the messages can be collected in one place."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import pyro_monteclora
from pyro_monteclora import MonteCLoRA
from pyro_monteclora.cli import main
from pyro_monteclora.io import save_pretrained
from pyro_monteclora.testing import TOY_WORDS, tiny_bert, toy_sentiment, toy_tokenizer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny base model folder with its tokenizer, a headless one, one twice as wide, good data, and a saved adapter."""
    root = tmp_path_factory.mktemp("bad")
    tokenizer = toy_tokenizer(TOY_WORDS, str(root))
    tiny_bert(vocab_size=len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tiny_bert(vocab_size=len(tokenizer)).bert.save_pretrained(root / "headless")  # no classification head
    tokenizer.save_pretrained(root / "headless")
    tiny_bert(vocab_size=len(tokenizer), hidden_size=32).save_pretrained(root / "wide")  # another hidden size
    tokenizer.save_pretrained(root / "wide")
    _write(root / "good.jsonl", [json.dumps(r) for r in toy_sentiment(16)])
    mc = MonteCLoRA.from_model(tiny_bert(vocab_size=len(tokenizer)), lora_r=4)
    mc.tokenizer = tokenizer
    save_pretrained(mc, root / "adapter")
    return root


def _write(path, lines, mode="w"):
    with open(path, mode) as handle:
        if mode == "wb":
            handle.write(lines)
        else:
            handle.write("\n".join(lines) + "\n")
    return str(path)


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *needles):
    """The CLI failed with exit code 1 and one line ``pyro-monteclora ...: error: ...`` naming ``needles``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert "Traceback" not in err and lines and lines[-1].startswith("pyro-monteclora"), err
    error = lines[-1]
    assert len(error) < 400, error
    for needle in needles:
        assert needle in error, (needle, error)
    return error


def _api_error(error, *needles):
    """An exception of the Python API: one line under 400 characters naming ``needles``."""
    message = str(error)
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def _train_cli(capsys, ws, data, *extra):
    return _cli(capsys, "train", "--model", ws / "base", "--data", data, "--output-dir", ws / "never", "--lora-r", "4",
                "--epochs", "1", "--batch-size", "8", *extra)


def _train_api(rows, **kwargs):
    kwargs = {"tokenizer": toy_tokenizer(TOY_WORDS), "progress": False, "lora_r": 4, **kwargs}
    return pyro_monteclora.train(tiny_bert(vocab_size=20), rows, **kwargs)


def _hidden(folder):
    return [name for name in os.listdir(folder) if name.startswith(".")]


def _digest(folder):
    """The SHA-256 of every file under ``folder``, by relative path (byte-identical or not)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }

