"""The bad-input census: each kind of bad input ends in one clear error (CLI: one line on stderr, exit
code 1, no traceback) or a documented, tested behaviour; nothing already written is damaged.

Every error is checked through :func:`_one_line_error` (CLI) or :func:`_api_error` (Python API), so
the messages can be collected in one place."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import pyro_monteclora
from pyro_monteclora import MonteCLoRA
from pyro_monteclora.cli import main
from pyro_monteclora.io import save_merged, save_pretrained
from pyro_monteclora.kohya import kohya_to_peft, peft_to_kohya
from pyro_monteclora.merge import merge
from pyro_monteclora.testing import TOY_WORDS, tiny_bert, toy_sentiment, toy_tokenizer


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny base model folder with its tokenizer, a headless one, good data, and a saved adapter."""
    root = tmp_path_factory.mktemp("bad")
    tokenizer = toy_tokenizer(TOY_WORDS, str(root))
    tiny_bert(vocab_size=len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tiny_bert(vocab_size=len(tokenizer)).bert.save_pretrained(root / "headless")  # no classification head
    tokenizer.save_pretrained(root / "headless")
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
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))}


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
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--task", "causal_lm")[::2], "needs a decoder")
    _one_line_error(*_cli(capsys, "train", "--model", "/nope", "--data", ws / "good.jsonl", "--output-dir",
                          ws / "never")[::2], "'/nope'", "does not exist")
    _one_line_error(*_cli(capsys, "train", "--data", ws / "missing.jsonl", "--output-dir", ws / "never")[::2],
                    "missing.jsonl", "does not exist")


def test_batch_larger_than_the_dataset_trains_one_step(ws):
    result = _train_api(toy_sentiment(4), num_epochs=1, batch_size=64)
    assert len(result.history) == 1 and result.history[0]["lr"] > 0  # no step at learning rate 0
    assert any(bool(p.abs().sum() > 0) for n, p in result.model.named_parameters() if "lora_B" in n)


class _ZeroGrads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()


def test_a_run_that_changed_nothing_fails_and_saves_nothing(ws, tmp_path):
    with pytest.raises(RuntimeError) as error:
        _train_api(toy_sentiment(8), num_epochs=1, batch_size=4, output_dir=str(tmp_path / "out"), callbacks=[_ZeroGrads()])
    _api_error(error.value, "changed no trainable tensor", "nothing was saved")
    assert os.listdir(tmp_path) == []


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


@pytest.mark.parametrize("epochs", [1, 3])
def test_a_diverging_run_is_one_error_and_saves_nothing(ws, capsys, epochs):
    out = ws / f"diverged-{epochs}"
    code, _, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir", out,
                        "--lora-r", "4", "--epochs", epochs, "--batch-size", "8", "--lr", "1e9")
    _one_line_error(code, err, "training diverged", "step", "learning_rate")
    assert not out.exists() or not os.listdir(out)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_training_leaves_no_folder(ws, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train_api(toy_sentiment(16), num_epochs=1, batch_size=4, output_dir=str(tmp_path / "out"), callbacks=[_Interrupt()])
    assert os.listdir(tmp_path) == []  # no output, no half-written or hidden folder


# --- outputs --------------------------------------------------------------------------------------


def test_output_targets(ws, capsys, monkeypatch):
    a_file = _write(ws / "a_file", ["x"])
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--output-dir", a_file)[::2], "already exists")
    _one_line_error(*_cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir",
                          os.path.join(a_file, "out"))[::2], "is a file")
    before = _digest(ws / "adapter")
    _one_line_error(*_train_cli(capsys, ws, ws / "good.jsonl", "--output-dir", ws / "adapter")[::2], "--overwrite")
    _one_line_error(*_cli(capsys, "convert-kohya", "--adapter-path", ws / "adapter", "--output", a_file)[::2],
                    "--overwrite")
    _one_line_error(*_cli(capsys, "evaluate", "--adapter-path", ws / "adapter", "--base-model", ws / "base", "--data",
                          ws / "good.jsonl", "--output", a_file)[::2], "already exists", "--overwrite")
    assert open(a_file).read() == "x\n"
    assert _digest(ws / "adapter") == before
    with pytest.raises(FileExistsError) as error:
        save_pretrained(MonteCLoRA.from_model(tiny_bert(), lora_r=4), ws / "base")  # a folder we did not write
    _api_error(error.value, "not a pyro-monteclora output", "overwrite=True")


def test_an_output_folder_that_cannot_be_written_is_found_before_training(ws, capsys, monkeypatch, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:  # root writes anywhere: then only the probe's failure can be simulated
        locked.chmod(0o555)
    else:
        import tempfile

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code, _, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir", locked / "out")
    error = _one_line_error(code, err, "cannot write to", str(locked))
    assert ".tmp" not in error and "classes" not in err  # names no hidden temp folder; found before any work
    locked.chmod(0o755)


def test_two_seeded_cli_runs_write_identical_adapters(ws, capsys):
    tensors = []
    for run in ("seed-a", "seed-b"):
        code, out, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir",
                              ws / run, "--lora-r", "4", "--epochs", "1", "--batch-size", "8", "--seed", "123")
        assert code == 0, err
        summary = json.loads(out)  # stdout is pure JSON
        assert summary["output_dir"].endswith(run) and "train_nll_per_example" in summary["metrics"]
        tensors.append(load_file(ws / run / "model.safetensors"))
    assert tensors[0].keys() == tensors[1].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    umask = os.umask(0)
    os.umask(umask)
    for folder in (ws / "seed-a", ws / "seed-a" / "adapter"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # normal permissions, not mkdtemp's 0700
    code, out, err = _cli(capsys, "predict", "--adapter-path", ws / "seed-a", "--base-model", ws / "base", "--text", "good")
    assert code == 0, err
    assert json.loads(out)["label"] in ("0", "1")  # integer labels print as their value, not LABEL_0


def test_the_cli_prints_no_library_noise(ws, capfd):
    code = main(["train", "--model", str(ws / "headless"), "--data", str(ws / "good.jsonl"), "--output-dir",
                 str(ws / "quiet-run"), "--lora-r", "4", "--epochs", "1", "--batch-size", "8"])
    out, err = capfd.readouterr()
    assert code == 0, err
    json.loads(out)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("MonteCLoRA")]
    assert lines == ["classification: 2 classes: 0, 1", "a new 2-class head was initialized (classifier)"], err


def _interrupt_then(function):
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return function(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("during", ["write", "swap"])
def test_ctrl_c_during_a_save_leaves_no_backup(ws, tmp_path, monkeypatch, during):
    import pyro_monteclora.io_atomic as io_atomic
    import pyro_monteclora.io_save as io_save

    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    folder = tmp_path / "adapter"
    save_pretrained(mc, folder)
    before = _digest(folder)
    if during == "write":
        monkeypatch.setattr(io_save, "save_file", _interrupt_then(io_save.save_file))
    else:  # after the old folder was moved aside: held until the new one is in place
        monkeypatch.setattr(io_atomic, "checkpoints_in", _interrupt_then(io_atomic.checkpoints_in))
    with torch.no_grad():
        next(p for n, p in mc.named_parameters() if "lora_B" in n).fill_(0.5)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(mc, folder)
    assert os.listdir(tmp_path) == ["adapter"]  # no .tmp-* or .old-* folder
    assert (_digest(folder) == before) == (during == "write")
    pyro_monteclora.load(tiny_bert(), folder)


def test_ctrl_c_during_the_cli_save(ws, capsys, monkeypatch):
    import pyro_monteclora.io_save as io_save

    monkeypatch.setattr(io_save, "save_file", _interrupt_then(io_save.save_file))
    code, out, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir",
                          ws / "interrupted", "--lora-r", "4", "--epochs", "1", "--batch-size", "8")
    assert code == 130 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "pyro-monteclora: interrupted"
    assert not (ws / "interrupted").exists() and not _hidden(ws)


def test_saving_refuses_nan_and_leaves_the_previous_files_untouched(ws, tmp_path):
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    folder = tmp_path / "adapter"
    save_pretrained(mc, folder)
    before = _digest(folder)
    with torch.no_grad():
        next(p for n, p in mc.named_parameters() if "lora_B" in n).view(-1)[0] = float("nan")
    for save in (save_pretrained, save_merged):
        with pytest.raises(ValueError) as error:
            save(mc, folder)
        _api_error(error.value, "refusing to save", "nan or inf", "nothing was written")
    assert _digest(folder) == before and os.listdir(tmp_path) == ["adapter"]


def test_the_kohya_tools_refuse_nan_and_existing_outputs(ws, tmp_path):
    output = tmp_path / "lora.safetensors"
    peft_to_kohya(str(ws / "adapter"), str(output))
    before = output.read_bytes()
    with pytest.raises(FileExistsError) as error:
        peft_to_kohya(str(ws / "adapter"), str(output))
    _api_error(error.value, "already exists", "overwrite=True")
    broken = tmp_path / "broken"
    shutil.copytree(ws / "adapter", broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError) as error:
        peft_to_kohya(str(broken), str(output), overwrite=True)
    _api_error(error.value, "refusing to save the Kohya file", "nan or inf")
    assert output.read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as error:
        kohya_to_peft(str(output), str(foreign))
    _api_error(error.value, "not a pyro-monteclora output", "overwrite=True")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["broken", "foreign", "lora.safetensors"]


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
    _one_line_error(*_cli(capsys, "predict", "--adapter-path", ws / "adapter", "--base-model", ws / "nope", "--text",
                          "good")[::2], "nope", "does not exist")


def test_prediction_inputs(ws, capsys):
    monteclora = pyro_monteclora.load(ws / "base", ws / "adapter")
    with pytest.raises(ValueError) as error:
        pyro_monteclora.predict(monteclora, [])
    _api_error(error.value, "is empty")
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
