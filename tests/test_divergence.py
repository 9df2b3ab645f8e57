"""Divergence stops training with one clear error; nothing diverged is saved; saves refuse nan."""

from __future__ import annotations

import hashlib
import os

import pyro
import pytest
import torch
from transformers import TrainerCallback

import pyro_monteclora
from pyro_monteclora import MonteCLoRA, TrainingDiverged
from pyro_monteclora.io import save_pretrained
from pyro_monteclora.testing import tiny_bert, toy_sentiment
from pyro_monteclora.train.divergence import DivergenceMonitor


class _Poison(TrainerCallback):
    """Before optimizer step ``step`` (from 1), put ``value`` into the first tensor named ``target``."""

    def __init__(self, step, target, value=float("nan")):
        self.step, self.target, self.value = step, target, value

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                name, tensor = next((n, p) for n, p in model.named_parameters() if self.target in n)
                tensor.view(-1)[0] = self.value


def _train(tokenizer, **overrides):
    values = dict(tokenizer=tokenizer, num_epochs=2, batch_size=4, lora_r=4, progress=False, learning_rate=1e-2)
    values.update(overrides)
    return pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(16), **values)


@pytest.mark.parametrize(
    "target, reported",
    [
        ("classifier.modules_to_save", "parameter .*classifier.* became non-finite"),  # nan logits, validated
        ("classifier.modules_to_save!", "the nll term became non-finite"),  # the same, Pyro's validation off
        ("lora_B", "the gradient of .*query.* became non-finite"),  # finite logits here, nan gradients
    ],
)
def test_a_nan_stops_training_names_the_step_and_term_and_keeps_the_last_checkpoint(
    tmp_path, word_tokenizer, target, reported
):
    if target.endswith("!"):
        pyro.enable_validation(False)  # the conftest turns it back on for the next test
        target = target[:-1]
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=f"(at|by) step 3: {reported}.*learning_rate") as error:
        _train(word_tokenizer, output_dir=str(out), save_steps=2, log_every=100, callbacks=[_Poison(3, target)])
    assert "\n" not in str(error.value) and len(str(error.value)) < 300
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # checkpoint-4 and the final output were refused
    again = pyro_monteclora.load(tiny_bert(vocab_size=16), out / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in again.parameters())


def test_a_huge_learning_rate_diverges_with_one_error_and_saves_nothing(tmp_path, word_tokenizer):
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="training diverged") as error:
        _train(word_tokenizer, output_dir=str(out), learning_rate=1e9, num_epochs=3)
    assert "\n" not in str(error.value) and "tensor(" not in str(error.value)
    assert not out.exists() or not os.listdir(out)


def test_a_variational_parameter_out_of_support_is_named(word_tokenizer):
    with pytest.raises(TrainingDiverged, match=r"at step 2: the kl term became non-finite \(guide\.d16\.concentration left its support"):
        _train(word_tokenizer, callbacks=[_Poison(2, "log_concentration", float("inf"))])


def test_the_monitor_reports_the_first_bad_gradient():
    monitor = DivergenceMonitor()
    good, bad = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    good.grad, bad.grad = torch.ones(2), torch.tensor([1.0, float("inf")])
    monitor.record_gradients(4, [("good", good), ("bad", bad)])
    monitor.record_gradients(5, [("good", good), ("bad", bad)])
    with pytest.raises(TrainingDiverged, match="at step 4: the gradient of bad became non-finite"):
        monitor.check({})
    clean = DivergenceMonitor()
    clean.record_gradients(1, [("good", good)])
    clean.check({"good": good})  # nothing to report


def _digest(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("where", ["lora_B", "log_scale_diag"])
def test_saving_refuses_nan_and_leaves_the_previous_files_untouched(tmp_path, where):
    mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    folder = tmp_path / "adapter"
    save_pretrained(mc, folder)
    before = _digest(folder)
    with torch.no_grad():
        next(p for n, p in mc.named_parameters() if where in n).view(-1)[0] = float("nan")
    for merged in (False, True):
        with pytest.raises(ValueError, match="refusing to save .*nan or inf"):
            mc.save_pretrained(str(folder), merged=merged)
    assert _digest(folder) == before
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temp folder left behind
