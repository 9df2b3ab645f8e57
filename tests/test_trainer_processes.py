"""Runs in other processes: exact resume after SIGKILL, an interrupted checkpoint write, two DDP processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import pyro_monteclora
from pyro_monteclora.testing import tiny_llama, toy_tokenizer
from pyro_monteclora.train.checkpoints import latest_checkpoint

RUN = r'''
import os, signal, sys
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
import pyro_monteclora
import pyro_monteclora.train.trainer as trainer_module
from pyro_monteclora.testing import TOY_WORDS, tiny_llama, toy_tokenizer

mode, out, final = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [{"prompt": f"{TOY_WORDS[i % 8]} is", "completion": TOY_WORDS[(3 * i) % 8]} for i in range(12)]

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

if mode == "midwrite":  # die halfway through writing checkpoint-6: adapter written, the rest not
    write = trainer_module.save_trained
    def half_write(monteclora, folder, **kwargs):
        write(monteclora, folder, **kwargs)
        if folder.endswith("checkpoint-6"):
            os.kill(os.getpid(), signal.SIGKILL)
    trainer_module.save_trained = half_write

result = pyro_monteclora.train(
    tiny_llama(vocab_size=16), rows, tokenizer=toy_tokenizer(), output_dir=out, save_steps=2, num_epochs=2,
    batch_size=4, lora_r=4, sample_scaler=0.5, lora_dropout=0.1, learning_rate=1e-2, progress=False, seed=5,
    merge_adapter=False, resume_from_checkpoint=True if mode == "resume" else None,
    callbacks=[KillAfterSave()] if mode == "kill" else None,
)
tensors = {n: p.detach().contiguous() for n, p in result.model.named_parameters() if p.requires_grad}
save_file(tensors, final)
print("STEPS", [int(r["step"]) for r in result.history])
'''


def _run(tmp_path, mode, out, final):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), mode, str(out), str(final)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_resume_after_sigkill_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full = _run(tmp_path, "full", tmp_path / "full", tmp_path / "full.safetensors")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _run(tmp_path, "kill", tmp_path / "resumed", tmp_path / "unused.safetensors")
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL right after checkpoint-4
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("checkpoint-4")
    resumed = _run(tmp_path, "resume", tmp_path / "resumed", tmp_path / "resumed.safetensors")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "STEPS [1, 2, 3, 4, 5, 6]" in full.stdout
    assert "STEPS [5, 6]" in resumed.stdout  # it did continue from checkpoint-4
    want, got = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert set(want) == set(got) and any(".posteriors." in k for k in want) and any("lora_B" in k for k in want)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # the checkpoints stay beside the final adapter, and each loads as an adapter folder
    again = pyro_monteclora.load(tiny_llama(vocab_size=16), tmp_path / "resumed" / "checkpoint-4")
    assert again.task == "causal_lm"
    assert os.path.isfile(tmp_path / "resumed" / "monteclora_config.json")


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    out = tmp_path / "out"
    died = _run(tmp_path, "midwrite", out, tmp_path / "unused.safetensors")
    assert died.returncode == -9, died.stderr[-3000:]
    assert os.path.isdir(out / "checkpoint-6")  # half written: no trainer_state.json
    assert latest_checkpoint(str(out)).endswith("checkpoint-4")
    mc = pyro_monteclora.load(tiny_llama(vocab_size=16), out / "checkpoint-4")
    assert all(torch.isfinite(p).all() for p in mc.guide.parameters())
    resumed = _run(tmp_path, "resume", out, tmp_path / "resumed.safetensors")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "STEPS [5, 6]" in resumed.stdout


DDP = r'''
import json, os, sys
import pyro_monteclora
import pyro_monteclora.train.trainer as trainer_module
from pyro_monteclora.testing import tiny_bert, toy_sentiment, toy_tokenizer

seen = []
compute_loss = trainer_module.MonteCLoRATrainerMixin.compute_loss
def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    seen.append({"index": inputs["index"].tolist(), "step_examples": self._step_examples})
    return compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
trainer_module.MonteCLoRATrainerMixin.compute_loss = recording

result = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=toy_tokenizer(), num_epochs=2,
                               batch_size=4, lora_r=4, learning_rate=1e-2, sample_scaler=0.5, progress=False)
params = {n: p.detach().tolist() for n, p in result.model.named_parameters() if p.requires_grad}
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump({"params": params, "seen": seen, "history": result.history,
               "world": int(os.environ["WORLD_SIZE"])}, handle)
'''


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
def test_two_processes_end_with_identical_parameters_and_draw_their_own_adapters(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["params"] == ranks[1]["params"]
    first = [set(r["seen"][0]["index"]) for r in ranks]
    assert not first[0] & first[1]  # each process trains on its own shard of the step
    assert all(s["step_examples"] == 8 for r in ranks for s in r["seen"])  # 2 processes x 4 examples
    cooperative = [[h["cooperative"] for h in r["history"]] for r in ranks]
    assert cooperative[0] != cooperative[1]  # each process draws its own adapter
