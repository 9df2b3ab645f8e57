"""Runs in other processes: exact resume after SIGKILL, an interrupted checkpoint write, two DDP processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import pyro_monteclora
from conftest import REPO
from pyro_monteclora.testing import tiny_bert, tiny_llama, toy_tokenizer
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


KNOBS = dict(num_epochs=2, batch_size=4, lora_r=4, learning_rate=1e-2, sample_scaler=0.5, max_grad_norm=None)

# Run by the README's accelerate command. Besides the trained parameters, each process records its
# first micro-batch, the random state its first adapter was drawn from, the parameters at the start
# and the first step's gradients after DDP's averaging (before the optimizer step; no clipping).
DDP = r"""
import json, os
from safetensors.torch import save_file
from transformers import TrainerCallback
import pyro_monteclora
import pyro_monteclora.train.draw as draw_module
import pyro_monteclora.train.trainer as trainer_module
from pyro_monteclora.testing import tiny_bert, toy_sentiment, toy_tokenizer

seen, first = [], {}
compute_loss = trainer_module.MonteCLoRATrainerMixin.compute_loss
def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    seen.append({"index": inputs["index"].tolist(), "step_examples": self._step_examples, "dataset_size": self.dataset_size})
    if len(seen) == 1:
        first.update({"batch." + k: v.detach().clone() for k, v in inputs.items()})
    return compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
trainer_module.MonteCLoRATrainerMixin.compute_loss = recording

capture_rng = draw_module.HeldDraw.capture_rng
def capturing(self, device):
    capture_rng(self, device)
    first.setdefault("rng", self._rng[1].clone())
draw_module.HeldDraw.capture_rng = capturing

class FirstStep(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        first.update({"start." + n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            first.update({"grad." + n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

result = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=toy_tokenizer(), progress=False,
                               callbacks=[FirstStep()], **KNOBS)
rank = os.environ["RANK"]
save_file({k: v.contiguous() for k, v in first.items()}, f"first{rank}.safetensors")
params = {n: p.detach().tolist() for n, p in result.model.named_parameters() if p.requires_grad}
with open(f"rank{rank}.json", "w") as handle:
    json.dump({"params": params, "seen": seen, "history": result.history, "world": int(os.environ["WORLD_SIZE"])}, handle)
""".replace("**KNOBS", ", ".join(f"{k}={v!r}" for k, v in KNOBS.items()))


def _readme_accelerate_command() -> list[str]:
    """The README's accelerate usage: its one bash block that starts with ``accelerate launch``."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        blocks = re.findall(r"```bash\n(accelerate launch [^\n]*)\n```", handle.read())
    assert len(blocks) == 1, blocks
    command = shlex.split(blocks[0])
    assert command[-1] == "my_training_script.py", command
    return command


def _single_process_gradients(firsts: list[dict[str, torch.Tensor]], dataset_size: int) -> dict[str, torch.Tensor]:
    """The step's gradient in one process, no accumulation: each process's examples with its own draw
    (the random state it drew from), the objective ``sum_i nll_i / n + KL / D + cooperative`` averaged
    over the draws."""
    from pyro_monteclora import MonteCLoRA, MonteCLoRAConfig
    from pyro_monteclora.train import ELBOLoss

    config = MonteCLoRAConfig(**KNOBS)
    mc = MonteCLoRA.from_model(tiny_bert(vocab_size=16), config)
    trainable = {n: p for n, p in mc.named_parameters() if p.requires_grad}
    assert set(trainable) == {k[len("start."):] for k in firsts[0] if k.startswith("start.")}
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(firsts[0][f"start.{name}"])
    mc.train()
    elbo = ELBOLoss(mc.model, mc.guide, config.kl_weight, config.cooperative_weight)
    with torch.random.fork_rng():  # the test process's own random state is left as it was
        for first in firsts:
            torch.set_rng_state(first["rng"])
            batch = {k[len("batch."):]: v for k, v in first.items() if k.startswith("batch.")}
            (elbo(batch, dataset_size).loss / len(firsts)).backward()
    return {n: p.grad for n, p in trainable.items() if p.grad is not None}


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
def test_the_readme_accelerate_command_runs_two_processes_that_agree(tmp_path):
    (tmp_path / "my_training_script.py").write_text(DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    start = time.perf_counter()
    run = subprocess.run(_readme_accelerate_command(), capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    wall = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-3000:]
    # the issue asks for under a minute; measured 14 s on a loaded 2-core machine. The bound leaves
    # room for a cold start on a busy CI machine, so that a correct run does not fail on timing.
    assert wall < 120, f"the 2-process run took {wall:.0f} s"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["params"] == ranks[1]["params"]
    first = [set(r["seen"][0]["index"]) for r in ranks]
    assert not first[0] & first[1]  # each process trains on its own shard of the step
    assert all(s["step_examples"] == 8 for r in ranks for s in r["seen"])  # 2 processes x 4 examples
    cooperative = [[h["cooperative"] for h in r["history"]] for r in ranks]
    assert cooperative[0] != cooperative[1]  # each process draws its own adapter
    # the loss weighting across processes: the averaged gradient is the single-process gradient
    firsts = [load_file(tmp_path / f"first{r}.safetensors") for r in (0, 1)]
    assert not torch.equal(firsts[0]["rng"], firsts[1]["rng"])  # two draws
    got = {k[len("grad."):]: v for k, v in firsts[0].items() if k.startswith("grad.")}
    assert got and all(torch.equal(v, firsts[1][f"grad.{k}"]) for k, v in got.items())  # DDP averaged them
    assert any(".posteriors." in k for k in got) and any("lora_B" in k for k in got)
    want = _single_process_gradients(firsts, ranks[0]["seen"][0]["dataset_size"])
    assert set(got) == set(want)
    difference = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert difference < 1e-5, difference
    print(f"2-process wall time {wall:.1f} s; gradient max abs difference {difference:.2e}")
