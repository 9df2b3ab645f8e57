"""train()'s guards: no step at learning rate 0, a run that changed nothing fails, a loss that ended
far above its start warns, the warm-up schedule, and Ctrl-C leaves no half-written folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

import pyro_monteclora
from pyro_monteclora.testing import tiny_bert, toy_sentiment
from pyro_monteclora.train.run import lr_lambda


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup, total", [(0, 1), (1, 2), (3, 10), (0, 7)])
def test_no_step_runs_at_learning_rate_zero(schedule, warmup, total):
    factors = [lr_lambda(k, warmup, total, schedule) for k in range(total)]
    assert all(0 < f <= 1 for f in factors), factors
    if warmup:
        assert factors[:warmup] == sorted(factors[:warmup]) and factors[warmup] == 1.0  # ramp, then the full rate
    if schedule == "constant":
        assert factors[warmup:] == [1.0] * (total - warmup)  # constant_with_warmup


def test_a_one_step_run_trains(word_tokenizer, tmp_path):
    result = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(8), tokenizer=word_tokenizer, num_epochs=1,
                                   batch_size=16, lora_r=4, progress=False, output_dir=str(tmp_path / "out"))
    assert len(result.history) == 1 and result.history[0]["lr"] == pytest.approx(1e-3)  # no warm-up for 1 step
    b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert any(bool(p.abs().sum() > 0) for p in b)  # LoRA B left zero: the first step did run


class _ZeroGrads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()


def test_a_run_that_changed_nothing_fails_and_saves_nothing(word_tokenizer, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="changed no trainable tensor.*nothing was saved"):
        pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(8), tokenizer=word_tokenizer, num_epochs=1,
                              batch_size=4, lora_r=4, progress=False, output_dir=str(out), callbacks=[_ZeroGrads()])
    assert not out.exists()


class _Sabotage(TrainerCallback):
    """From step 2 on, a head bias of +-20 makes every prediction one class: the loss ends far above its start."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= 2:
            with torch.no_grad():
                bias = next(p for n, p in model.named_parameters() if "classifier.modules_to_save" in n and "bias" in n)
                bias.copy_(torch.tensor([20.0, -20.0]))


def test_a_loss_that_ends_far_above_its_start_warns(word_tokenizer):
    with pytest.warns(UserWarning, match="far above where it started"):
        result = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=word_tokenizer,
                                       num_epochs=2, batch_size=4, lora_r=4, progress=False, callbacks=[_Sabotage()])
    assert len(result.warnings) == 1 and "lower learning_rate" in result.warnings[0]


def test_a_normal_run_does_not_warn(word_tokenizer, recwarn):
    result = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=word_tokenizer, num_epochs=2,
                                   batch_size=4, lora_r=4, progress=False, learning_rate=5e-3)
    assert result.warnings == []


INTERRUPT = r'''
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C works even if our parent ignores SIGINT
from transformers import TrainerCallback
import pyro_monteclora
from pyro_monteclora.testing import tiny_bert, toy_sentiment, toy_tokenizer

class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=toy_tokenizer(), num_epochs=2, batch_size=4,
                      lora_r=4, progress=False, output_dir=sys.argv[1], save_steps=2, callbacks=[Interrupt()])
'''


def test_ctrl_c_during_training_leaves_only_complete_checkpoints(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", INTERRUPT, str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "KeyboardInterrupt" in run.stderr
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # no final output, no hidden temp folder
    assert os.path.isfile(out / "checkpoint-2" / "trainer_state.json")
    assert sorted(os.listdir(tmp_path)) == ["out"]
