"""FSDP2 in two processes on the CPU (gloo) against one process with the same global batch, and on GPUs.

One script, three runs of six SGD steps (momentum 0.9, clipping on) on a tiny Llama, global batch 8:

- **one process**, 4 examples per micro-batch, 2 micro-batches per step (in the test's process);
- **FSDP2, two processes**, 4 examples each, started by ``accelerate launch --config_file
  examples/accelerate/fsdp2.yaml``, saving ``checkpoint-3`` and ``checkpoint-6``;
- **FSDP2, resumed**: two processes started by torchrun with ``TrainingArguments(fsdp=True,
  fsdp_config={"version": 2})`` (the other way in) from a copy of that ``checkpoint-3``.

Micro-batch ``k`` of step ``s`` draws its adapter (and its dropout masks) from seed
``1000 s + k``, where ``k`` is the process under FSDP and the micro-batch of the step in one
process, so both runs make the same draws on the same examples; each FSDP process still draws
its own adapter (``k`` differs). The runs then compute the same objective and differ only by
float32 rounding: see :func:`test_fsdp_on_two_cpu_processes_matches_one_process` for the tolerance.
The optimizer is SGD with momentum (its state is saved and restored on resume), not AdamW: see there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

CONFIG = os.path.join(REPO, "examples", "accelerate", "fsdp2.yaml")

RUN = r'''
import json, os, sys
import torch
from transformers import TrainingArguments
from pyro_monteclora import MonteCLoRA, MonteCLoRATrainer
from pyro_monteclora.testing import TOY_WORDS, nonzero_lora_b, tiny_llama, toy_tokenizer
from pyro_monteclora.train.batches import examples_dataset

ROWS = [{"prompt": f"{TOY_WORDS[i % 8]} is {TOY_WORDS[(5 * i) % 8]}", "completion": TOY_WORDS[(3 * i) % 8]}
        for i in range(24)]


class Pinned(MonteCLoRATrainer):
    """Micro-batch k of step s draws from seed 1000 s + k (k: the process, or the micro-batch of the step)."""

    micro = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.accelerator.num_processes > 1:
            slot = self.accelerator.process_index
        else:
            slot = self.micro % self.args.gradient_accumulation_steps
        self.micro += 1
        torch.manual_seed(1000 * (self.state.global_step + 1) + slot)
        self.seen.append([self.state.global_step + 1, slot, inputs["index"].tolist()])
        return super().training_step(model, inputs, num_items_in_batch)


def run(out, processes, fsdp_args=False, resume=None, cpu=True):
    torch.manual_seed(0)  # the LoRA A factors' initialization
    mc = MonteCLoRA.from_model(tiny_llama(vocab_size=16), lora_r=4, sample_scaler=0.5, lora_dropout=0.1)
    nonzero_lora_b(mc.network)  # B = 0 would hide the noise in A
    if not cpu:
        mc = mc.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    data, collator = examples_dataset(mc, ROWS, toy_tokenizer(), max_length=16)
    fsdp = dict(fsdp=True, fsdp_config={"version": 2}) if fsdp_args else {}
    args = TrainingArguments(out, per_device_train_batch_size=4, gradient_accumulation_steps=2 if processes == 1 else 1,
                             num_train_epochs=2, learning_rate=0.1, optim="sgd", optim_args="momentum=0.9", seed=5,
                             use_cpu=cpu, save_strategy="steps", save_steps=3, logging_steps=1, report_to="none",
                             disable_tqdm=True, **fsdp)
    trainer = Pinned(model=mc, args=args, train_dataset=data, data_collator=collator)
    trainer.seen = []
    trainer.train(resume_from_checkpoint=resume)
    kinds = {n: type(p).__name__ for n, p in mc.named_parameters()}
    return {"fsdp": trainer.is_fsdp_enabled, "type": str(trainer.accelerator.distributed_type),
            "world": trainer.accelerator.num_processes, "seen": trainer.seen,
            "log": [h for h in trainer.state.log_history if "loss" in h and "step" in h],
            "sharded": sorted(n for n, k in kinds.items() if k == "DTensor"),
            "whole": sorted(n for n, k in kinds.items() if k != "DTensor")}


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    record = run(out, 2, fsdp_args=mode == "resume", resume=True if mode == "resume" else None,
                 cpu=os.environ.get("FSDP_TEST_DEVICE", "cpu") == "cpu")
    with open(os.path.join(out, f"record{os.environ['RANK']}.json"), "w") as handle:
        json.dump(record, handle)
'''


def _launch(command, tmp_path, device="cpu"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "FSDP_TEST_DEVICE": device}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _records(out):
    return [json.loads((out / f"record{r}.json").read_text()) for r in (0, 1)]


def _adapter(folder):
    return {**load_file(folder / "adapter_model.safetensors"), **load_file(folder / "monteclora_posterior.safetensors")}


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
def test_fsdp_on_two_cpu_processes_matches_one_process(tmp_path):
    (tmp_path / "run.py").write_text(RUN)
    start = time.perf_counter()
    _launch(["accelerate", "launch", "--config_file", CONFIG, "run.py", "full", str(tmp_path / "fsdp")], tmp_path)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "run.py", "resume",
             str(tmp_path / "resumed")], tmp_path)
    wall = time.perf_counter() - start
    namespace = {"__name__": "single"}
    exec(RUN, namespace)
    with torch.random.fork_rng():
        single = namespace["run"](str(tmp_path / "single"), 1)

    fsdp, resumed = _records(tmp_path / "fsdp"), _records(tmp_path / "resumed")
    for record in fsdp + resumed:
        assert record["fsdp"] and record["type"] == "DistributedType.FSDP" and record["world"] == 2
        # the frozen base and the LoRA factors are sharded; the guide stays whole
        assert any("lora_A" in n for n in record["sharded"]) and any("base_layer" in n for n in record["sharded"])
        assert record["whole"] and all(n.startswith("guide.") for n in record["whole"])
    # the same examples in each step: process k's micro-batch is the single run's micro-batch k
    assert sorted(s for r in fsdp for s in r["seen"]) == sorted(single["seen"])
    assert [s[0] for s in resumed[0]["seen"]] == [4, 5, 6]  # it continued from checkpoint-3

    # Tolerance. Each micro-batch is the same computation in both runs (same parameters, examples, draws
    # and dropout masks, same shapes), so its gradient is bitwise the same. The runs combine two of them
    # differently: one process adds them into .grad with weights 1/8 (nll) and 1/2 (regularizer); FSDP
    # weights them 2/8 and 1 on each process and averages the processes (reduce-scatter for A and B, an
    # all-reduce for the guide). Powers of two scale without rounding, so the step's gradient is bitwise
    # the same too (measured: steps 1-2 identical). What differs is the gradient norm for clipping: FSDP
    # sums the squares shard by shard, in another order, a relative difference of a few float32 units
    # (u = 6e-8), say <= 1e-6. SGD (lr 0.1, momentum 0.9, clipped norm <= 1) turns that into <= 1e-7 per
    # step, <= 1e-6 once momentum has summed it (1 / (1 - 0.9) = 10), <= 6e-6 over six steps: we allow
    # 5e-5 on every adapter tensor. The loss moves by at most |grad| * 6e-6, with |grad| <= 16 (the
    # logged grad_norm): 1e-4. AdamW is not used here: it divides each entry by its own RMS, so a
    # rounding difference in an entry whose gradient is near zero (the q/k LoRA factors of this tiny
    # model) flips the sign of a step of size lr (measured: 0.017 apart after six steps at lr 1e-2).
    # Counting the KL and cooperative terms once per process instead fails (measured: 0.42 apart).
    want = [(h["step"], h["loss"], h["nll"], h["kl"], h["cooperative"]) for h in single["log"]]
    for record in fsdp:
        got = [(h["step"], h["loss"], h["nll"], h["kl"], h["cooperative"]) for h in record["log"]]
        assert [g[0] for g in got] == [w[0] for w in want] == [1, 2, 3, 4, 5, 6]
        difference = max(abs(g - w) for gs, ws in zip(got, want) for g, w in zip(gs[1:], ws[1:]))
        assert difference < 1e-4, (difference, got, want)
    print("one process, loss:", [round(w[1], 6) for w in want])
    print("FSDP, loss:       ", [round(h["loss"], 6) for h in fsdp[0]["log"]])
    print(f"largest difference of a logged term {difference:.2e}; 2-process runs {wall:.0f} s")

    # the adapter files: FSDP equals one process (tolerance above), resumed equals uninterrupted (exactly)
    single_files = _adapter(tmp_path / "single" / "checkpoint-6")
    fsdp_files = _adapter(tmp_path / "fsdp" / "checkpoint-6")
    resumed_files = _adapter(tmp_path / "resumed" / "checkpoint-6")
    assert set(single_files) == set(fsdp_files) == set(resumed_files)
    assert any("lora_A" in k for k in fsdp_files) and any("concentration" in k for k in fsdp_files)
    for name in single_files:
        assert torch.allclose(fsdp_files[name], single_files[name], rtol=0, atol=5e-5), name
        assert torch.equal(resumed_files[name], fsdp_files[name]), name
    largest = max(float((fsdp_files[k] - single_files[k]).abs().max()) for k in single_files)
    print(f"largest difference of an adapter tensor {largest:.2e}")
    files = [{f for f in os.listdir(tmp_path / run / "checkpoint-6") if not f.startswith("rng_state")}
             for run in ("single", "fsdp")]
    assert files[0] == files[1], files  # the same files (one random state per process aside) ...
    for name in ("adapter_config.json", "monteclora_config.json"):  # ... and the same configurations
        texts = [json.loads((tmp_path / run / "checkpoint-6" / name).read_text()) for run in ("single", "fsdp")]
        for text in texts:  # peft writes a set: its order follows each process's string hashing
            text["target_modules"] = sorted(text.get("target_modules") or [])
        assert texts[0] == texts[1], name
    _peft_loads(tmp_path / "fsdp" / "checkpoint-6")


def _peft_loads(folder):
    """Stock peft loads the FSDP run's adapter; its network is our mean adapter."""
    from peft import PeftModel

    import pyro_monteclora
    from pyro_monteclora.testing import tiny_llama

    peft_model = PeftModel.from_pretrained(tiny_llama(vocab_size=16), str(folder)).eval()
    ours = pyro_monteclora.load(tiny_llama(vocab_size=16), folder).eval()
    batch = {"input_ids": torch.tensor([[2, 6, 3, 5, 7]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        assert torch.allclose(peft_model(**batch).logits, ours.mean_logits(batch), atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not on PATH")
def test_fsdp_on_two_gpus_runs_and_saves_the_adapter(tmp_path):
    """The same run on two GPUs (NCCL): FSDP on, base sharded, guide whole, a loadable adapter."""
    (tmp_path / "run.py").write_text(RUN)
    _launch(["accelerate", "launch", "--config_file", CONFIG, "run.py", "full", str(tmp_path / "fsdp")], tmp_path,
            device="cuda")
    for record in _records(tmp_path / "fsdp"):
        assert record["fsdp"] and record["type"] == "DistributedType.FSDP" and record["world"] == 2
        assert all(n.startswith("guide.") for n in record["whole"])
        assert [h["step"] for h in record["log"]] == [1, 2, 3, 4, 5, 6]
    _peft_loads(tmp_path / "fsdp" / "checkpoint-6")
