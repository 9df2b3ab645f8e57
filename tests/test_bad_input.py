"""The bad-input census, what goes in: data files, rows and labels, configuration, models and adapter
folders. Each kind of bad input ends in one clear error (CLI: one line on stderr, exit code 1, no
traceback) or a documented, tested behaviour, through both the Python API and the CLI.

What comes out (runs that fail, output folders, saves) is in ``tests/test_bad_outputs.py``; the
shared fixture and checks are in ``tests/census.py``."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from census import _api_error, _cli, _one_line_error, _train_api, _train_cli, _write, ws  # noqa: F401  (ws: fixture)
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import pyro_monteclora
from pyro_monteclora import MonteCLoRA
from pyro_monteclora.cli import main
from pyro_monteclora.export.merge import merge
from pyro_monteclora.testing import TOY_WORDS, tiny_bert, toy_sentiment


# --- data files: the file, the 1-based line, the reason --------------------------------------------

BAD_FILES = {
    "jsonl-missing-brace": ("x.jsonl", ['{"text": "good", "label": 1}', '"text": "bad", "label": 0}'], ("line 2", "invalid JSON")),
    "json-trailing-comma": ("x.json", ['[{"text": "good", "label": 1},', ' {"text": "bad", "label": 0},', "]"], ("line 3", "invalid JSON")),
    "json-not-rows": ("x.json", ['["good", "bad"]'], ("row 1", "not an object")),
    "json-nan-label": ("x.json", ['[{"text": "good", "label": 1}, {"text": "bad", "label": NaN}]'], ("row 2", "missing (NaN)")),
    "json-empty-list": ("x.json", ["[]"], ("is empty",)),
    "jsonl-empty": ("x.jsonl", [""], ("is empty",)),
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
    _api_error(error.value, path, *needles)
    _one_line_error(*_train_cli(capsys, ws, path)[::2], os.path.basename(path), *needles)


def test_non_utf8_bytes(ws, capsys):
    path = _write(ws / "latin1.jsonl", b'{"text": "good", "label": 1}\n{"text": "caf\xe9", "label": 0}\n', "wb")
    with pytest.raises(ValueError) as error:
        pyro_monteclora.data.load_data(path)
    _api_error(error.value, path, "line 2", "not valid UTF-8")
    _one_line_error(*_train_cli(capsys, ws, path)[::2], "latin1.jsonl", "line 2", "not valid UTF-8")


def test_column_oriented_json_is_read_as_rows(ws):
    path = _write(ws / "columns.json", [json.dumps({"text": ["good", "bad"], "label": [1, 0]})])
    assert pyro_monteclora.data.load_data(path).to_list() == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]


def test_an_empty_label_cell_names_its_row(ws, capsys):
    path = _write(ws / "empty-cell.csv", ["text,label", "good,1", "bad,"])
    with pytest.raises(ValueError) as error:
        _train_api(path)
    _api_error(error.value, "row 2", "missing")
    _one_line_error(*_train_cli(capsys, ws, path)[::2], "empty-cell.csv", "row 2", "missing")


BAD_ROWS = {
    "float-label": ([{"text": "good", "label": 1}, {"text": "bad", "label": 0.5}], ("row 2", "float")),
    "null-label": ([{"text": "good", "label": 1}, {"text": "bad", "label": None}], ("row 2", "missing")),
    "bool-label": ([{"text": "good", "label": True}, {"text": "bad", "label": False}], ("row 1", "bool")),
    "out-of-range": ([{"text": "good", "label": 1}, {"text": "bad", "label": 7}], ("row 2", "out of range")),
    "integer-text": ([{"text": "good", "label": 1}, {"text": 5, "label": 0}], ("'text'", "row 2", "must be text")),
    "null-text": ([{"text": "good", "label": 1}, {"text": None, "label": 0}], ("'text'", "row 2", "missing")),
    "missing-column": ([{"sentence": "good", "label": 1}], ("needs columns text/label",)),
    "empty-list": ([], ("empty",)),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_through_the_api(ws, case):
    rows, needles = BAD_ROWS[case]
    with pytest.raises(ValueError) as error:
        _train_api(rows)
    _api_error(error.value, *needles)


def test_labels_in_the_cli(ws, capsys):
    gaps = _write(ws / "gaps.jsonl", [json.dumps({"text": "good", "label": 0}), json.dumps({"text": "bad", "label": 5})])
    _one_line_error(*_train_cli(capsys, ws, gaps)[::2], "gaps.jsonl", "skip class", "--num-labels 6")
    single = _write(ws / "single.jsonl", [json.dumps({"text": w, "label": 0}) for w in ("good", "bad")])
    _one_line_error(*_train_cli(capsys, ws, single)[::2], "single.jsonl", "single class")
    mixed = _write(ws / "mixed.jsonl", [json.dumps({"text": "good", "label": 1}), json.dumps({"text": "bad", "label": "neg"})])
    _one_line_error(*_train_cli(capsys, ws, mixed)[::2], "mixed.jsonl", "row 2", "all integers or all strings")
    columns = _write(ws / "sentences.jsonl", [json.dumps({"sentence": w, "label": i % 2}) for i, w in enumerate(TOY_WORDS)])
    _one_line_error(*_train_cli(capsys, ws, columns)[::2], "needs columns text/label", "'sentence'")
    floats = _write(ws / "float.jsonl", [json.dumps({"text": "good", "label": 1}), json.dumps({"text": "bad", "label": 0.5})])
    _one_line_error(*_train_cli(capsys, ws, floats)[::2], "float.jsonl", "row 2", "float")
    wide = _write(ws / "wide.jsonl", [json.dumps({"text": w, "label": label}) for w, label in (("good", 1), ("bad", 0), ("sad", 7))])
    _one_line_error(*_train_cli(capsys, ws, wide, "--num-labels", "2")[::2], "wide.jsonl", "row 3", "out of range",
                    "[0, 2)")


def test_a_single_class_dataset(ws):
    """Documented (pyro_monteclora.data): in the API the classes are the model's, so data of one class
    trains a head of ``num_labels`` classes; the CLI, which infers the classes, refuses it (above)."""
    rows = [{"text": w, "label": 0} for w in TOY_WORDS[:8]]
    result = _train_api(rows, num_epochs=1, batch_size=4)
    assert len(result.history) == 2 and result.model.network.config.num_labels == 2
    assert pyro_monteclora.predict(result.model, ["good"], num_samples=2)["probs"].shape == (1, 2)


def test_empty_strings_are_legal_text(ws):
    result = _train_api([{"text": "", "label": 0}, {"text": "good", "label": 1}] * 4, num_epochs=1, batch_size=4)
    assert len(result.history) == 2


# --- configuration and model ------------------------------------------------------------------------


def test_bad_configuration_and_model(ws, capsys):
    with pytest.raises(ValueError) as error:
        pyro_monteclora.MonteCLoRAConfig(lora_dropout=1.5)
    _api_error(error.value, "lora_dropout must be in [0, 1), got 1.5")
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--lora-dropout", "1.5")[::2], "lora_dropout")
    with pytest.raises(ValueError) as error:
        MonteCLoRA.from_model(tiny_bert(), lora_r=4, target_modules=["nope"])
    _api_error(error.value, "'nope'", "matches no adaptable layer")
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--target-modules", "nope")[::2], "nope")
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--modules-to-save", "nonexistent_head")[::2],
                    "modules_to_save", "nonexistent_head")
    with pytest.raises(ValueError) as error:
        _train_api(toy_sentiment(8), modules_to_save=["nonexistent_head"])
    _api_error(error.value, "modules_to_save", "nonexistent_head", "matches no module")
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--task", "causal_lm")[::2], "needs a decoder")
    with pytest.raises(ValueError) as error:
        _train_api(toy_sentiment(8), task="causal_lm")
    _api_error(error.value, "task='causal_lm' needs a decoder", "bert encoder")
    _one_line_error(*_cli(capsys, "train", "--model", "/nope", "--data", ws / "good.jsonl", "--output-dir",
                          ws / "never")[::2], "'/nope'", "does not exist")
    _one_line_error(*_cli(capsys, "train", "--data", ws / "missing.jsonl", "--output-dir", ws / "never")[::2],
                    "missing.jsonl", "does not exist")


def test_batch_larger_than_the_dataset_trains_one_step(ws):
    result = _train_api(toy_sentiment(4), num_epochs=1, batch_size=64)
    assert len(result.history) == 1 and result.history[0]["lr"] > 0  # no step at learning rate 0
    assert any(bool(p.abs().sum() > 0) for n, p in result.model.named_parameters() if "lora_B" in n)


def test_batch_larger_than_the_dataset_in_the_cli(ws, capsys):
    four = _write(ws / "four.jsonl", [json.dumps(r) for r in toy_sentiment(4)])
    code, out, err = _cli(capsys, "train", "--model", ws / "base", "--data", four, "--output-dir", ws / "one-step",
                          "--lora-r", "4", "--epochs", "1", "--batch-size", "64")
    assert code == 0, err
    assert json.loads(out)["metrics"]["train_steps"] == 1
    tensors = load_file(ws / "one-step" / "adapter" / "adapter_model.safetensors")
    assert any(bool(t.abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k)  # it trained


def test_constant_schedule_warms_up_first(ws):
    result = _train_api(toy_sentiment(16), num_epochs=1, batch_size=2, lr_scheduler="constant", warmup_ratio=0.5,
                        learning_rate=1e-3)
    rates = [row["lr"] for row in result.history]
    assert rates == sorted(rates) and 0 < rates[0] < rates[-1], rates  # a warm-up ramp, then constant_with_warmup
    assert rates[-4:] == [pytest.approx(1e-3)] * 4, rates


class _Sabotage(TrainerCallback):
    """From step 2 on, a head bias of +-20 makes every prediction one class: the loss ends far above its start."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= 2:
            with torch.no_grad():
                bias = next(p for n, p in model.named_parameters() if "classifier.modules_to_save" in n and "bias" in n)
                bias.copy_(torch.tensor([20.0, -20.0]))


def test_a_loss_that_ends_far_above_its_start_warns(ws):
    with pytest.warns(UserWarning, match="far above where it started"):
        result = _train_api(toy_sentiment(16), num_epochs=2, batch_size=4, callbacks=[_Sabotage()])
    assert len(result.warnings) == 1
    _api_error(result.warnings[0], "lower learning_rate")



# --- loading adapters -----------------------------------------------------------------------------


class _Planted:
    """Unpickling this writes a marker file: the planted pickle must never be loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damage(folder, damage):
    if damage == "folder-missing":
        shutil.rmtree(folder)
    elif damage == "posterior-missing":
        os.remove(folder / "monteclora_posterior.safetensors")
    elif damage == "config-missing":
        os.remove(folder / "monteclora_config.json")
    elif damage == "config-corrupt":
        _write(folder / "monteclora_config.json", ["{not json"])
    elif damage in ("config-field-missing", "rank-edited"):
        meta = json.loads((folder / "monteclora_config.json").read_text())
        if damage == "rank-edited":
            meta["config"]["lora_r"] = 8
        else:
            del meta["groups"]
        (folder / "monteclora_config.json").write_text(json.dumps(meta))
    elif damage == "peft-config-missing":
        os.remove(folder / "adapter_config.json")
    elif damage == "peft-config-corrupt":
        _write(folder / "adapter_config.json", ['{"peft_type": "LORA",'])
    elif damage == "posterior-truncated":
        data = (folder / "monteclora_posterior.safetensors").read_bytes()
        (folder / "monteclora_posterior.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "posterior-nan":
        tensors = load_file(folder / "monteclora_posterior.safetensors")
        key = sorted(tensors)[0]
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, folder / "monteclora_posterior.safetensors")
    else:
        os.remove(folder / "adapter_model.safetensors")
        (folder / "adapter_model.bin").write_bytes(pickle.dumps({"boom": _Planted(str(folder / "unpickled"))}))


DAMAGES = {
    "folder-missing": ("does not exist",),
    "posterior-missing": ("monteclora_posterior.safetensors is missing",),
    "config-missing": ("no monteclora_config.json",),
    "config-corrupt": ("monteclora_config.json, line 1", "invalid JSON"),
    "config-field-missing": ("monteclora_config.json", "'groups'", "missing"),
    "rank-edited": ("adapter_model.safetensors", "lora_r", "(4, 16)", "(8, 16)"),
    "peft-config-missing": ("adapter_config.json is missing",),
    "peft-config-corrupt": ("adapter_config.json, line 2", "invalid JSON"),
    "posterior-truncated": ("monteclora_posterior.safetensors", "truncated"),
    "posterior-nan": ("monteclora_posterior.safetensors", "nan or inf"),
    "pickle-planted": ("adapter_model.safetensors is missing", "never loaded"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_adapter_folders(ws, capsys, damage):
    folder = ws / f"damaged-{damage}"
    shutil.copytree(ws / "adapter", folder)
    _damage(folder, damage)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        pyro_monteclora.load(str(ws / "base"), folder)
    _api_error(error.value, *DAMAGES[damage])
    code, _, err = _cli(capsys, "predict", "--adapter-path", folder, "--base-model", ws / "base", "--text", "good")
    _one_line_error(code, err, *DAMAGES[damage])
    assert not (folder / "unpickled").exists()


def test_adapter_on_another_base(ws, capsys):
    with pytest.raises(ValueError) as error:
        pyro_monteclora.load(tiny_bert(vocab_size=20, hidden_size=32), ws / "adapter")
    _api_error(error.value, "adapted layers differ", "16 wide in the adapter, 32 wide in the base model")
    with pytest.raises(ValueError) as error:
        pyro_monteclora.load(tiny_bert(vocab_size=20, num_labels=3), ws / "adapter")
    _api_error(error.value, "2-class head", "num_labels=3", "num_labels=2")
    _one_line_error(*_cli(capsys, "predict", "--adapter-path", ws / "adapter", "--base-model", ws / "wide", "--text",
                          "good")[::2], "adapted layers differ", "16 wide in the adapter, 32 wide in the base model")
    _one_line_error(*_cli(capsys, "predict", "--adapter-path", ws / "adapter", "--base-model", ws / "nope", "--text",
                          "good")[::2], "nope", "does not exist")


def test_prediction_inputs(ws, capsys):
    monteclora = pyro_monteclora.load(ws / "base", ws / "adapter")
    with pytest.raises(ValueError) as error:
        pyro_monteclora.predict(monteclora, [])
    _api_error(error.value, "is empty")
    for function in (pyro_monteclora.predict, pyro_monteclora.evaluate):
        with pytest.raises(ValueError) as error:
            function(monteclora, [{"text": "good", "label": 1}], num_samples=-1)
        _api_error(error.value, "num_samples must be a non-negative integer, got -1")
    predict = ("predict", "--adapter-path", ws / "adapter", "--base-model", ws / "base")
    _one_line_error(*_cli(capsys, *predict)[::2], "nothing to predict")
    _one_line_error(*_cli(capsys, *predict, "--text", "good", "--num-samples", "-1")[::2], "num_samples")
    empty = _write(ws / "nothing.jsonl", [""])
    _one_line_error(*_cli(capsys, *predict, "--data", empty)[::2], "nothing.jsonl", "is empty")
    no_text = _write(ws / "no-text.jsonl", [json.dumps({"sentence": "good"}), json.dumps({"sentence": "bad"})])
    _one_line_error(*_cli(capsys, *predict, "--data", no_text)[::2], "no-text.jsonl", "no 'text' column")
    _one_line_error(*_cli(capsys, "inspect", "--adapter-path", ws / "adapter", "--base-model", ws / "base",
                          "--num-samples", "0")[::2], "--num-samples")


def test_merge_needs_exactly_one_target(ws, capsys):
    with pytest.raises(ValueError) as error:
        merge(str(ws / "base"), str(ws / "adapter"), str(ws / "m"), "me/repo")
    _api_error(error.value, "exactly one")
    with pytest.raises(SystemExit) as error:  # a usage error: argparse's usage line, then one error line, exit 2
        main(["merge", "--base-model-path", str(ws / "base"), "--adapter-path", str(ws / "adapter"),
              "--output-folder", str(ws / "m"), "--push-to-hub", "me/repo"])
    err = capsys.readouterr().err.strip().splitlines()
    assert error.value.code == 2 and err[-1].startswith("pyro-monteclora merge: error:") and "not allowed with" in err[-1]
    assert not (ws / "m").exists()
