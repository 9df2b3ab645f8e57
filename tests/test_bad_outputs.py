"""The bad-input census, what comes out: runs that fail (nothing saved), output targets (checked
before any work, with one clear error), seeded and quiet runs, and saves that are interrupted or
refused (earlier files stay byte-identical).

What goes in (data, configuration, models, adapter folders) is in ``tests/test_bad_input.py``;
the shared fixture and checks are in ``tests/census.py``."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import warnings

import pytest
import torch
from census import _api_error, _cli, _digest, _hidden, _one_line_error, _train_api, _train_cli, _write, ws  # noqa: F401
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import pyro_monteclora
from pyro_monteclora import MonteCLoRA
from pyro_monteclora.cli import main
from pyro_monteclora.io import save_merged, save_pretrained
from pyro_monteclora.export.kohya import kohya_to_peft, peft_to_kohya
from pyro_monteclora.export.merge import merge
from pyro_monteclora.testing import tiny_bert, toy_sentiment

# --- runs that fail save nothing ------------------------------------------------------------------


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



@pytest.mark.parametrize("epochs", [1, 3])
def test_a_diverging_run_is_one_error_and_saves_nothing(ws, capsys, epochs):
    out = ws / f"diverged-{epochs}"
    code, _, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir", out,
                        "--lora-r", "4", "--epochs", epochs, "--batch-size", "8", "--lr", "1e9")
    # seeded, so the same every time: the step it went bad by, and the variational parameter that left its support
    _one_line_error(code, err, "training diverged by step 2:", "guide.d16.concentration left its support",
                    "lower learning_rate")
    assert not out.exists() or not os.listdir(out)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_training_leaves_no_folder(ws, tmp_path, interruptible):
    with pytest.raises(KeyboardInterrupt):
        _train_api(toy_sentiment(16), num_epochs=1, batch_size=4, output_dir=str(tmp_path / "out"), callbacks=[_Interrupt()])
    assert os.listdir(tmp_path) == []  # no output, no half-written or hidden folder


def test_ctrl_c_during_cli_training_leaves_no_folder(ws, capsys, monkeypatch, tmp_path, interruptible):
    api = importlib.import_module("pyro_monteclora.train.api")

    class Interrupted(api.RunTrainer):  # the CLI's Trainer, with a SIGINT after its first step
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "callbacks": [*kwargs.get("callbacks", []), _Interrupt()]})

    monkeypatch.setattr(api, "RunTrainer", Interrupted)
    code, out, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir",
                          tmp_path / "out", "--lora-r", "4", "--epochs", "2", "--batch-size", "4")
    assert code == 130 and out == "" and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "pyro-monteclora: interrupted"
    assert os.listdir(tmp_path) == []  # no output folder, no hidden temp folder


# --- output targets: one rule, checked before any work ----------------------------------------------


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




def test_a_target_of_the_wrong_kind_fails_before_any_work_even_with_overwrite(ws, capsys):
    """``--overwrite`` replaces an output of the same kind only: a file is no output folder, a folder no output file."""
    a_file = _write(ws / "a_file_too", ["x"])
    code, out, err = _train_cli(capsys, ws, ws / "good.jsonl", "--output-dir", a_file, "--overwrite")
    _one_line_error(code, err, a_file, "exists and is not a folder")
    assert out == "" and "classes" not in err  # before the data was read, let alone training
    a_folder = ws / "a_folder.safetensors"
    a_folder.mkdir()
    (a_folder / "keep.txt").write_text("mine")
    code, out, err = _cli(capsys, "evaluate", "--adapter-path", ws / "adapter", "--base-model", ws / "base", "--data",
                          ws / "good.jsonl", "--output", a_folder, "--overwrite")
    _one_line_error(code, err, str(a_folder), "is a folder; the output is a file")
    assert out == ""  # no metrics printed: refused before the evaluation
    _one_line_error(*_cli(capsys, "convert-kohya", "--adapter-path", ws / "adapter", "--output", a_folder,
                          "--overwrite")[::2], "is a folder; the output is a file")
    assert open(a_file).read() == "x\n" and os.listdir(a_folder) == ["keep.txt"]


def _locked(tmp_path, monkeypatch):
    """A folder nothing can be written in (read-only; as root, where that is not enforced, the probe fails)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o555)
    else:
        import tempfile

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    return locked


def test_an_output_folder_that_cannot_be_written_is_found_before_training(ws, capsys, monkeypatch, tmp_path):
    locked = _locked(tmp_path, monkeypatch)
    code, _, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--output-dir", locked / "out")
    error = _one_line_error(code, err, "cannot write to", str(locked))
    assert ".tmp" not in error and "classes" not in err  # names no hidden temp folder; found before any work
    locked.chmod(0o755)


class _Began(TrainerCallback):
    began = False

    def on_train_begin(self, args, state, control, **kwargs):
        _Began.began = True


def test_the_api_checks_its_output_folder_before_training(ws, monkeypatch, tmp_path):
    a_file = _write(tmp_path / "a_file", ["x"])
    with pytest.raises(FileExistsError) as error:
        _train_api(toy_sentiment(8), num_epochs=1, batch_size=4, output_dir=a_file, callbacks=[_Began()])
    _api_error(error.value, a_file, "exists and is not a folder")
    with pytest.raises(NotADirectoryError) as error:
        _train_api(toy_sentiment(8), num_epochs=1, batch_size=4, output_dir=os.path.join(a_file, "out"),
                   callbacks=[_Began()])
    _api_error(error.value, "is a file, not a folder")
    locked = _locked(tmp_path, monkeypatch)
    with pytest.raises(PermissionError) as error:
        _train_api(toy_sentiment(8), num_epochs=1, batch_size=4, output_dir=str(locked / "deep" / "out"),
                   callbacks=[_Began()])
    _api_error(error.value, "cannot write to", str(locked))
    locked.chmod(0o755)
    assert not _Began.began and open(a_file).read() == "x\n" and os.listdir(locked) == []  # nothing created


# --- seeded and quiet runs ----------------------------------------------------------------------------


def test_two_seeded_cli_runs_write_identical_adapters(ws, capsys):
    written = []
    for run in ("seed-a", "seed-b"):
        code, out, err = _cli(capsys, "train", "--model", ws / "base", "--data", ws / "good.jsonl", "--eval-data",
                              ws / "good.jsonl", "--output-dir", ws / run, "--lora-r", "4", "--epochs", "1",
                              "--batch-size", "8", "--seed", "123")
        assert code == 0, err
        summary = json.loads(out)  # the whole of stdout is one JSON document: it can be piped
        assert "epoch 0: accuracy=" in err and "epoch 0" not in out  # the evaluation line goes to stderr
        assert summary["output_dir"].endswith(run)
        metrics = summary["metrics"]  # each NLL names its unit, the same for training and evaluation
        assert {"train_nll_per_example", "eval_nll_per_example"} <= set(metrics), metrics
        assert not {"train_nll", "eval_nll"} & set(metrics), metrics
        written.append({str(p.relative_to(ws / run)): p.read_bytes() for p in sorted((ws / run).rglob("*.safetensors"))})
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "adapter/monteclora_posterior.safetensors"} <= set(
        written[0]
    ), sorted(written[0])
    assert written[0].keys() == written[1].keys()
    for name in written[0]:
        assert written[0][name] == written[1][name], name  # byte for byte
    umask = os.umask(0)
    os.umask(umask)
    for folder in (ws / "seed-a", ws / "seed-a" / "adapter"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask  # normal permissions, not mkdtemp's 0700
    code, out, err = _cli(capsys, "predict", "--adapter-path", ws / "seed-a", "--base-model", ws / "base", "--text", "good")
    assert code == 0, err
    assert json.loads(out)["label"] in ("0", "1")  # integer labels print as their value, not LABEL_0


def test_the_cli_prints_no_library_noise_unless_verbose(ws, capfd, caplog):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    runs = {}
    for name, extra in (("quiet-run", []), ("verbose-run", ["--verbose"])):
        caplog.clear()
        code = main(["train", "--model", str(ws / "headless"), "--data", str(ws / "good.jsonl"), "--output-dir",
                     str(ws / name), "--lora-r", "4", "--epochs", "1", "--batch-size", "8", *extra])
        out, err = capfd.readouterr()
        assert code == 0, err
        json.loads(out)
        runs[name] = (err, caplog.text)
        assert hf_logging.get_verbosity() == before  # the libraries' settings outlive no call, verbose or not
    lines = [line for line in runs["quiet-run"][0].replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("MonteCLoRA")]
    assert lines == ["classification: 2 classes: 0, 1", "a new 2-class head was initialized (classifier)"], runs
    assert "LOAD REPORT" not in runs["quiet-run"][1]
    assert "LOAD REPORT" in runs["verbose-run"][1] and "classifier.weight" in runs["verbose-run"][1]  # transformers' own
    assert "Loading weights" in runs["verbose-run"][0]  # and its progress bars


def test_verbose_reaches_evaluate_and_predict(ws, capsys, monkeypatch):
    import pyro_monteclora.prediction.evaluation as evaluation
    import pyro_monteclora.prediction.predictive as predictive
    from transformers.utils import logging as hf_logging

    seen = []

    def spy(function):
        def wrapped(*args, **kwargs):
            seen.append(hf_logging.get_verbosity())
            return function(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(evaluation, "evaluation_outputs", spy(evaluation.evaluation_outputs))
    monkeypatch.setattr(predictive, "_classification_examples", spy(predictive._classification_examples))
    before = hf_logging.get_verbosity()
    assert before < logging.ERROR
    loaded = ("--adapter-path", ws / "adapter", "--base-model", ws / "base", "--num-samples", "2")
    for extra in ([], ["--verbose"]):
        assert _cli(capsys, "evaluate", *loaded, "--data", ws / "good.jsonl", *extra)[0] == 0
        assert _cli(capsys, "predict", *loaded, "--text", "good", *extra)[0] == 0
    assert seen == [logging.ERROR, logging.ERROR, before, before]  # quiet by default; --verbose changes nothing


def test_the_cli_leaves_the_warnings_settings_as_they_were(ws, capsys):
    filters, formatwarning = list(warnings.filters), warnings.formatwarning
    predict = ("predict", "--adapter-path", ws / "adapter", "--base-model", ws / "base", "--text", "good")
    assert _cli(capsys, *predict)[0] == 0
    assert _cli(capsys, *predict, "--num-samples", "-1")[0] == 1
    assert warnings.filters == filters and warnings.formatwarning is formatwarning


# --- saves: interrupted or refused, earlier files stay byte-identical ---------------------------------

def _interrupt_then(function):
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return function(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("during", ["write", "swap"])
def test_ctrl_c_during_a_save_leaves_no_backup(ws, tmp_path, monkeypatch, during, interruptible):
    import pyro_monteclora.io.atomic as io_atomic
    import pyro_monteclora.io.save as io_save

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


def test_ctrl_c_during_the_cli_save(ws, capsys, monkeypatch, interruptible):
    import pyro_monteclora.io.save as io_save

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



def _inf_kohya_file(good, bad):
    tensors = load_file(good)
    key = next(k for k in tensors if "lora_down" in k)
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    with safe_open(good, framework="pt") as handle:  # keep the metadata (module names)
        metadata = handle.metadata()
    save_file(tensors, bad, metadata=metadata)


def test_kohya_to_peft_refuses_inf_and_leaves_the_previous_folder_untouched(ws, tmp_path):
    good = tmp_path / "lora.safetensors"
    peft_to_kohya(str(ws / "adapter"), str(good))
    folder = tmp_path / "peft"
    kohya_to_peft(str(good), str(folder))
    before = _digest(folder)
    _inf_kohya_file(good, tmp_path / "inf.safetensors")
    with pytest.raises(ValueError) as error:
        kohya_to_peft(str(tmp_path / "inf.safetensors"), str(folder), overwrite=True)
    _api_error(error.value, "refusing to save the peft adapter", "nan or inf")
    assert _digest(folder) == before and sorted(os.listdir(tmp_path)) == ["inf.safetensors", "lora.safetensors", "peft"]


def test_merge_refuses_nan_and_leaves_the_previous_folder_untouched(ws, capsys, tmp_path):
    merged = tmp_path / "merged"
    merge(str(ws / "base"), str(ws / "adapter"), str(merged))
    before = _digest(merged)
    broken = tmp_path / "broken"
    shutil.copytree(ws / "adapter", broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(ValueError) as error:
        merge(str(ws / "base"), str(broken), str(merged), overwrite=True)
    _api_error(error.value, "nan or inf")
    _one_line_error(*_cli(capsys, "merge", "--base-model-path", ws / "base", "--adapter-path", broken,
                          "--output-folder", merged, "--overwrite")[::2], "nan or inf")
    assert _digest(merged) == before and sorted(os.listdir(tmp_path)) == ["broken", "merged"]
