"""Training step and memory on transformers' Trainer: MonteCLoRATrainer vs plain peft LoRA on Trainer.

Both methods run under the same ``TrainingArguments`` (AdamW, clipping, linear schedule, no
saving) on the same fixed batch. One repetition trains each method for ``--steps`` optimizer
steps (the order rotates between repetitions); a step is timed from Trainer's
``on_step_begin`` to ``on_step_end`` (forward, backward, clipping, optimizer and scheduler
step), the first step of each run is dropped, and the reported ratio is the median over
repetitions of (median MonteCLoRA step / median LoRA step), so load from other processes hits
both alike.

Memory is counted the way it would sit on an accelerator (CPU has no allocator peak counter):
parameters and buffers of the model (frozen and trainable) + gradients + AdamW state + the
tensors saved for backward by one ``compute_loss`` (unique storages, through
``saved_tensors_hooks``) + MonteCLoRA's held noise (one LoRA-A-sized tensor per layer). With activation checkpointing, only what the checkpoints keep is
saved; the saving is reported for both methods.

Usage: ``python -m benchmarks.trainer_overhead [--reps 6] [--steps 4] [--models minilm,llama,smollm2]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from . import overhead  # the models and batches of the step benchmark
from pyro_monteclora import MonteCLoRA, MonteCLoRAConfig, MonteCLoRATrainer

LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


class FixedBatch(torch.utils.data.Dataset):
    """``size`` copies of the rows of one batch (so every step sees the same tensors)."""

    def __init__(self, batch: dict, size: int) -> None:
        self.rows = [{k: v[i] for k, v in batch.items() if k != "index"} for i in range(len(batch["input_ids"]))]
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return self.rows[index % len(self.rows)]


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.seconds.append(time.perf_counter() - self._start)


def _args(batch_size: int, steps: int, checkpointing: bool) -> TrainingArguments:
    return TrainingArguments(
        "/tmp/pyro-monteclora-trainer-overhead", per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=1e-4, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_steps=10_000, remove_unused_columns=False, activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None, log_level="error",
    )


def answer_batch(batch_size: int, length: int, answer_tokens: int = 4, vocab: int = 49152, seed: int = 0) -> dict:
    """Instruction-like causal-LM batch: random tokens, only the last ``answer_tokens`` scored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch_size, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_trainers(make_base: Callable[[], Any], batch: dict, causal: bool, steps: int, checkpointing: bool) -> dict:
    size = len(batch["input_ids"])
    data = FixedBatch(batch, size * steps)
    torch.manual_seed(0)
    task = "CAUSAL_LM" if causal else "SEQ_CLS"
    lora = get_peft_model(make_base(), LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"],
                                                  lora_dropout=LORA["lora_dropout"], target_modules="all-linear",
                                                  task_type=task))
    torch.manual_seed(0)
    ours = MonteCLoRA.from_model(make_base(), MonteCLoRAConfig(**LORA))
    methods = [("lora", lora, Trainer), ("ours", ours, MonteCLoRATrainer)]
    if causal:  # ours with the LM head on every position, as plain LoRA computes it
        torch.manual_seed(0)
        full = MonteCLoRA.from_model(make_base(), MonteCLoRAConfig(**LORA))
        full.model.logits_on_targets = False
        methods.append(("ours_full_logits", full, MonteCLoRATrainer))
    trainers = {}
    for name, model, kind in methods:
        timer = StepTimer()
        trainer = kind(model=model, args=_args(size, steps, checkpointing), train_dataset=data, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainers[name] = (trainer, timer)
    return trainers


def step_ratios(trainers: dict, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median over repetitions of each method's median step over LoRA's, and the median steps."""
    ratios, medians = {name: [] for name in trainers}, {name: [] for name in trainers}
    names = list(trainers)
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        per_rep = {}
        for name in order:
            trainer, timer = trainers[name]
            timer.seconds = []
            trainer.train()
            per_rep[name] = statistics.median(timer.seconds[1:])
            medians[name].append(per_rep[name])
        for name in names:
            ratios[name].append(per_rep[name] / per_rep["lora"])
    return ({n: statistics.median(v) for n, v in ratios.items()}, {n: statistics.median(v) for n, v in medians.items()})


def training_memory(trainer: Trainer) -> int:
    """Bytes: model parameters and buffers + grads + AdamW state + tensors saved by one compute_loss."""
    model = trainer.model
    model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size)])
    seen: set[int] = set()
    saved = 0

    def pack(tensor):
        nonlocal saved
        key = tensor.untyped_storage().data_ptr()
        if not isinstance(tensor, torch.nn.Parameter) and key not in seen:
            seen.add(key)
            saved += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(model, batch)
    del loss
    if hasattr(trainer, "held_draw"):  # the held draw's noise lives through the backward pass too
        saved += sum(leaf.untyped_storage().nbytes() for leaf in trainer.held_draw.leaves.values())
        trainer.held_draw.release()
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + 3 * trainable + saved  # + grads + two AdamW moments


def compare(label: str, make_base, batch: dict, causal: bool, reps: int, steps: int, lines: list[str]) -> None:
    lines += ["", f"### {label}", "", f"batch: {tuple(batch['input_ids'].shape)} tokens; {reps} repetitions of "
              f"{steps} steps per method.", "",
              "| checkpointing | LoRA step (ms) | ours step (ms) | step / LoRA | LoRA memory (MiB) | ours memory (MiB) "
              "| memory / LoRA |", "|---|---|---|---|---|---|---|"]
    memory, full = {}, []
    for checkpointing in (False, True) if causal else (False,):
        trainers = make_trainers(make_base, batch, causal, steps, checkpointing)
        ratios, medians = step_ratios(trainers, reps)
        memory[checkpointing] = {name: training_memory(t) for name, (t, _) in trainers.items()}
        m = memory[checkpointing]
        lines.append(
            f"| {'on' if checkpointing else 'off'} | {medians['lora'] * 1e3:.0f} | {medians['ours'] * 1e3:.0f} | "
            f"**{ratios['ours']:.3f}** | {m['lora'] / 2**20:.1f} | {m['ours'] / 2**20:.1f} | **{m['ours'] / m['lora']:.3f}** |"
        )
        if "ours_full_logits" in ratios:
            full.append(
                f"| {'on' if checkpointing else 'off'} | {ratios['ours_full_logits']:.3f} | "
                f"{m['ours_full_logits'] / m['lora']:.3f} | {ratios['ours_full_logits'] / ratios['ours']:.3f} |"
            )
        print("\n".join(lines[-1:] + full[-1:]), flush=True)
    if full:
        lines += ["", "MonteCLoRA with the LM head on every position (as plain LoRA computes it), and what computing "
                  "logits only on the scored positions saves:", "",
                  "| checkpointing | step / LoRA | memory / LoRA | step, all positions / answer positions |",
                  "|---|---|---|---|", *full]
    if True in memory:
        lines += [""] + [
            f"Activation checkpointing saves {(memory[False][n] - memory[True][n]) / 2**20:.1f} MiB "
            f"({1 - memory[True][n] / memory[False][n]:.1%}) of {name}'s training memory."
            for n, name in (("lora", "LoRA"), ("ours", "MonteCLoRA"))
        ]


def smollm2():
    from pyro_monteclora.examples import load_smollm2

    model, _ = load_smollm2()
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="minilm,llama,smollm2")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.trainer_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Overhead on transformers' Trainer: MonteCLoRATrainer vs plain peft LoRA on Trainer",
        "",
        f"Command: `{command.strip()}`; date: {datetime.date.today()}; torch {torch.__version__}, "
        f"{args.threads} CPU thread(s); ratios from one run (absolute times depend on the machine's load).",
        "LoRA r=16, alpha=32, dropout 0.05, all-linear; MonteCLoRA defaults (N=4 components, epsilon 5e-3).",
    ]
    models = args.models.split(",")
    if "minilm" in models:
        compare("MiniLM (all-MiniLM-L6-v2), 32 x 64 tokens", overhead.minilm, overhead.batch_for("minilm", 32, 64),
                False, args.reps, args.steps, lines)
    if "llama" in models:
        compare("Random-init Llama (hidden 1024, 4 blocks), 2 x 128 tokens, all scored", lambda: overhead.llama(4, 1024),
                overhead.batch_for("llama", 2, 128), True, max(2, args.reps // 2), args.steps, lines)
    if "smollm2" in models:
        batch = answer_batch(8, 128, answer_tokens=4)
        compare("SmolLM2-135M-Instruct (GGUF, dequantized), 8 x 128 tokens, the last 4 scored", smollm2, batch, True,
                max(2, args.reps // 3), max(3, args.steps - 1), lines)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "trainer_overhead.md"), "w", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
