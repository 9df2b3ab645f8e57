"""The bad-input census: each kind of bad input ends in one clear error (CLI: one line on stderr, exit
code 1, no traceback) or a documented, tested behaviour; nothing already written is damaged."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import pyro_monteclora
from pyro_monteclora import MonteCLoRA
from pyro_monteclora.cli import main
from pyro_monteclora.io import save_pretrained
from pyro_monteclora.testing import TOY_WORDS, tiny_bert, toy_sentiment, toy_tokenizer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny base model folder with its tokenizer, good data, and a saved adapter."""
    root = tmp_path_factory.mktemp("bad")
    tokenizer = toy_tokenizer(TOY_WORDS, str(root))
    tiny_bert(vocab_size=len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
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
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert "Traceback" not in err and lines and lines[-1].startswith("pyro-monteclora"), err
    error = lines[-1]
    assert len(error) < 400, error
    for needle in needles:
        assert needle in error, (needle, error)
    return error


def _train_cli(capsys, ws, data, *extra):
    return _cli(capsys, "train", "--model", ws / "base", "--data", data, "--output-dir", ws / "never", "--lora-r", "4",
                "--epochs", "1", "--batch-size", "8", *extra)


# --- data files: the file, the 1-based line, the reason --------------------------------------------

BAD_FILES = {
    "jsonl-missing-brace": ("x.jsonl", ['{"text": "good", "label": 1}', '"text": "bad", "label": 0}'], ("line 2", "invalid JSON")),
    "json-trailing-comma": ("x.json", ['[{"text": "good", "label": 1},', ' {"text": "bad", "label": 0},', "]"], ("line 3", "invalid JSON")),
    "json-not-rows": ("x.json", ['["good", "bad"]'], ("row 1", "not an object")),
    "csv-unclosed-quote": ("x.csv", ["text,label", '"good,1', "bad,0"], ("line", "unclosed quote")),
    "csv-ragged-row": ("x.csv", ["text,label", "good,1", "bad,0,extra"], ("line 3", "3 cells")),
    "csv-empty": ("x.csv", [""], ("is empty",)),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_files_name_the_file_and_line(ws, capsys, case):
    name, lines, needles = BAD_FILES[case]
    path = _write(ws / f"{case}-{name}", lines)
    with pytest.raises(ValueError) as error:
        pyro_monteclora.data.load_data(path)
    message = str(error.value)
    assert path in message and "\n" not in message and all(n in message for n in needles), message
    _one_line_error(*_train_cli(capsys, ws, path)[::2], os.path.basename(path), *needles)


def test_non_utf8_bytes(ws, capsys):
    path = _write(ws / "latin1.jsonl", b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 0}\n', "wb")
    _one_line_error(*_train_cli(capsys, ws, path)[::2], "latin1.jsonl", "line 2", "not valid UTF-8")


def test_column_oriented_json_is_read_as_rows(ws):
    path = _write(ws / "columns.json", [json.dumps({"text": ["good", "bad"], "label": [1, 0]})])
    assert pyro_monteclora.data.load_data(path).to_list() == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]


BAD_ROWS = {
    "float-label": ([{"text": "good", "label": 1}, {"text": "bad", "label": 0.5}], ("row 2", "float")),
    "null-label": ([{"text": "good", "label": 1}, {"text": "bad", "label": None}], ("row 2", "missing")),
    "bool-label": ([{"text": "good", "label": True}, {"text": "bad", "label": False}], ("row 1", "bool")),
    "out-of-range": ([{"text": "good", "label": 1}, {"text": "bad", "label": 7}], ("row 2", "out of range")),
    "integer-text": ([{"text": "good", "label": 1}, {"text": 5, "label": 0}], ("'text'", "row 2", "must be text")),
    "null-text": ([{"text": "good", "label": 1}, {"text": None, "label": 0}], ("'text'", "row 2", "missing")),
    "missing-column": ([{"sentence": "good", "label": 1}], ("needs columns text/label",)),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_through_the_api(ws, case):
    rows, needles = BAD_ROWS[case]
    with pytest.raises(ValueError) as error:
        pyro_monteclora.train(tiny_bert(vocab_size=20), rows, tokenizer=toy_tokenizer(TOY_WORDS), progress=False)
    assert all(n in str(error.value) for n in needles), str(error.value)


def test_labels_in_the_cli(ws, capsys):
    gaps = _write(ws / "gaps.jsonl", [json.dumps({"text": "good", "label": 0}), json.dumps({"text": "bad", "label": 5})])
    _one_line_error(*_train_cli(capsys, ws, gaps)[::2], "skip class", "--num-labels 6")
    single = _write(ws / "single.jsonl", [json.dumps({"text": w, "label": 0}) for w in ("good", "bad")])
    _one_line_error(*_train_cli(capsys, ws, single)[::2], "single class")
    mixed = _write(ws / "mixed.jsonl", [json.dumps({"text": "good", "label": 1}), json.dumps({"text": "bad", "label": "neg"})])
    _one_line_error(*_train_cli(capsys, ws, mixed)[::2], "all integers or all strings")


def test_empty_strings_are_legal_text(ws):
    rows = [{"text": "", "label": 0}, {"text": "good", "label": 1}] * 4
    result = pyro_monteclora.train(tiny_bert(vocab_size=20), rows, tokenizer=toy_tokenizer(TOY_WORDS), num_epochs=1,
                                   batch_size=4, progress=False)
    assert len(result.history) == 2


# --- configuration and model ------------------------------------------------------------------------


def test_bad_configuration_and_model(ws, capsys):
    with pytest.raises(ValueError, match="lora_dropout must be in \\[0, 1\\), got 1.5"):
        pyro_monteclora.MonteCLoRAConfig(lora_dropout=1.5)
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--lora-dropout", "1.5")[::2], "lora_dropout")
    with pytest.raises(ValueError, match="matches no adaptable layer"):
        MonteCLoRA.from_model(tiny_bert(), lora_r=4, target_modules=["nope"])
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--target-modules", "nope")[::2], "nope")
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--modules-to-save", "nonexistent_head")[::2],
                    "modules_to_save", "nonexistent_head")
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--task", "causal_lm")[::2], "needs a decoder")
    _one_line_error(*_cli(capsys, "train", "--model", "/nope", "--data", ws / "good.jsonl", "--output-dir",
                          ws / "never")[::2])
    _one_line_error(*_cli(capsys, "train", "--data", ws / "missing.jsonl", "--output-dir", ws / "never")[::2],
                    "missing.jsonl", "does not exist")


def test_batch_larger_than_the_dataset_trains_one_step(ws):
    result = pyro_monteclora.train(tiny_bert(vocab_size=20), toy_sentiment(4), tokenizer=toy_tokenizer(TOY_WORDS),
                                   num_epochs=1, batch_size=64, progress=False)
    assert len(result.history) == 1 and result.history[0]["lr"] > 0


def test_a_diverging_run_is_one_error_and_saves_nothing(ws, capsys):
    out = ws / "diverged"
    code, _, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir", out,
                        "--lora-r", "4", "--epochs", "3", "--batch-size", "8", "--lr", "1e9")
    _one_line_error(code, err, "training diverged", "learning_rate")
    assert not out.exists() or not os.listdir(out)


# --- outputs --------------------------------------------------------------------------------------


def _digest(folder):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


def test_output_targets(ws, capsys):
    a_file = _write(ws / "a_file", ["x"])
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--output-dir", a_file)[::2], "already exists")
    _one_line_error(*_cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir",
                          os.path.join(a_file, "out"))[::2], "is a file")
    before = _digest(ws / "adapter")
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--output-dir", ws / "adapter")[::2], "--overwrite")
    _one_line_error(*_cli(capsys, "convert-kohya", "--adapter-path", ws / "adapter", "--output", a_file)[::2],
                    "--overwrite")
    assert _digest(ws / "adapter") == before


def test_two_seeded_cli_runs_write_identical_adapters(ws, capsys):
    from safetensors.torch import load_file

    tensors = []
    for run in ("seed-a", "seed-b"):
        code, out, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir",
                              ws / run, "--lora-r", "4", "--epochs", "1", "--batch-size", "8", "--seed", "123")
        assert code == 0, err
        assert json.loads(out)["output_dir"].endswith(run)  # stdout is pure JSON
        tensors.append(load_file(ws / run / "model.safetensors"))
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


# --- loading adapters -----------------------------------------------------------------------------


def _copy_adapter(ws, name):
    import shutil

    target = ws / name
    shutil.copytree(ws / "adapter", target)
    return target


@pytest.mark.parametrize("damage", ["posterior-missing", "config-missing", "config-corrupt", "posterior-truncated",
                                    "pickle-planted"])
def test_damaged_adapter_folders(ws, capsys, damage):
    folder = _copy_adapter(ws, damage)
    if damage == "posterior-missing":
        os.remove(folder / "monteclora_posterior.safetensors")
    elif damage == "config-missing":
        os.remove(folder / "monteclora_config.json")
    elif damage == "config-corrupt":
        _write(folder / "monteclora_config.json", ["{not json"])
    elif damage == "posterior-truncated":
        data = (folder / "monteclora_posterior.safetensors").read_bytes()
        (folder / "monteclora_posterior.safetensors").write_bytes(data[: len(data) // 2])
    else:
        os.remove(folder / "adapter_model.safetensors")
        torch.save({"boom": torch.zeros(1)}, folder / "adapter_model.bin")  # must never be unpickled
    code, _, err = _cli(capsys, "predict", "--adapter-path", folder, "--base-model", ws / "base", "--text", "good")
    _one_line_error(code, err)
    if damage == "pickle-planted":
        assert "never loaded" in err


def test_adapter_on_a_base_of_another_width(ws):
    with pytest.raises((ValueError, RuntimeError)) as error:
        pyro_monteclora.load(tiny_bert(vocab_size=20, hidden_size=32), ws / "adapter")
    assert len(str(error.value)) < 2000


def test_prediction_inputs(ws, capsys):
    monteclora = pyro_monteclora.load(ws / "base", ws / "adapter")
    with pytest.raises(ValueError, match="is empty"):
        pyro_monteclora.predict(monteclora, [])
    _one_line_error(*_cli(capsys, "predict", "--adapter-path", ws / "adapter", "--base-model", ws / "base")[::2],
                    "nothing to predict")
    _one_line_error(*_cli(capsys, "predict", "--adapter-path", ws / "adapter", "--base-model", ws / "base", "--text",
                          "good", "--num-samples", "-1")[::2], "num_samples")
    _one_line_error(*_cli(capsys, "inspect", "--adapter-path", ws / "adapter", "--base-model", ws / "base",
                          "--num-samples", "0")[::2], "--num-samples")


def test_merge_needs_exactly_one_target(ws, capsys):
    with pytest.raises(SystemExit) as error:
        main(["merge", "--base-model-path", str(ws / "base"), "--adapter-path", str(ws / "adapter"),
              "--output-folder", str(ws / "m"), "--push-to-hub", "me/repo"])
    assert error.value.code == 2 and "not allowed with" in capsys.readouterr().err
