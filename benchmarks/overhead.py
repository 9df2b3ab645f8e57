"""Training-step time, memory and Pyro bookkeeping of pyro_monteclora vs peft LoRA and peft's variant.

One process, ``torch.set_num_threads(threads)``; every repetition runs one step of every
variant in turn (rotating the order), and a ratio is the median over repetitions of the
per-repetition ratio to plain LoRA's step, so load from other processes hits all variants alike.

- step: forward + backward + gradient clipping + AdamW step, on the same batch.
- memory: CPU has no allocator peak counter, so "peak training memory" is counted the way it
  would sit on an accelerator: parameters and buffers (frozen and trainable) + gradients + AdamW
  state + the tensors saved for backward by one forward pass (unique storages, through
  ``saved_tensors_hooks``).
- bookkeeping: the part of pyro_monteclora's step that is not the network's forward/backward:
  the step's forward time minus the time inside the network's ``forward`` (guide trace, priors,
  replay, noise, likelihood, KL, cooperative loss); measured on 2, 8 and 32 adapted layers with
  ``group_layers`` on and off.
- posterior predictive: S = 8 guide draws (``pyro_monteclora.prediction.predictive.Predictive`` when it exists,
  else 8 ``sample_logits`` calls) vs 8 plain forwards of the mean adapter.

Usage: ``python -m benchmarks.overhead [--reps 10] [--quick] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import common
from pyro_monteclora import MonteCLoRA, MonteCLoRAConfig
from pyro_monteclora.train.elbo import ELBOLoss
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM


# ------------------------------------------------------------------------------------ models
def minilm(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(common.minilm_path(), num_labels=2)


def llama(num_layers: int = 4, hidden: int = 1024, seed: int = 0) -> LlamaForCausalLM:
    """Random-init Llama with LLM-like layer shapes (small vocabulary: the cost is in the layers)."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def batch_for(kind: str, batch_size: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = 512 if kind == "llama" else 30000
    ids = torch.randint(5, vocab, (batch_size, length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.arange(batch_size)}
    batch["labels"] = ids.clone() if kind == "llama" else torch.randint(0, 2, (batch_size,), generator=g)
    return batch


# -------------------------------------------------------------------------------- step makers
class Variant:
    """One method's training step on a fixed batch."""

    def __init__(self, name: str, step: Callable[[], None], parameters, optimizer, forward: Callable[[], torch.Tensor]):
        self.name, self.step, self.parameters, self.optimizer, self.forward = name, step, parameters, optimizer, forward


def _finish(loss, parameters, optimizer):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, common.MAX_GRAD_NORM)
    optimizer.step()


def _loss_of(logits, labels, causal: bool):
    if causal:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    return F.cross_entropy(logits, labels)


def peft_variant(name: str, base, batch: dict, variant: bool, causal: bool, **lora) -> Variant:
    model = common.peft_model(0, variant, model=base, causal_lm=causal, **lora)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    inputs = common._inputs(batch)

    def forward():
        loss = _loss_of(model(**inputs).logits, batch["labels"], causal)
        if variant:
            loss = loss + model.base_model._get_monteclora_loss()
        return loss

    return Variant(name, lambda: _finish(forward(), parameters, optimizer), parameters, optimizer, forward)


def ours_variant(name: str, base, batch: dict, dataset_size: int = 10_000, **overrides) -> tuple[Variant, MonteCLoRA]:
    config = MonteCLoRAConfig(**{**common.LORA_OURS, **overrides})
    torch.manual_seed(0)
    mc = MonteCLoRA.from_model(base, config)
    mc.train()
    objective = ELBOLoss(mc.model, mc.guide, config.kl_weight, config.cooperative_weight)
    parameters = mc.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def forward():
        return objective(batch, dataset_size).loss

    return Variant(name, lambda: _finish(forward(), parameters, optimizer), parameters, optimizer, forward), mc


# ------------------------------------------------------------------------------- measurements
def interleaved_times(variants: list[Variant], reps: int, warmup: int = 2) -> dict[str, list[float]]:
    for v in variants:
        for _ in range(warmup):
            v.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for rep in range(reps):
        order = variants[rep % len(variants):] + variants[: rep % len(variants)]
        for v in order:
            start = time.perf_counter()
            v.step()
            times[v.name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def training_memory(v: Variant) -> int:
    """Bytes: all parameters/buffers of the module tree + grads + AdamW state + saved activations."""
    seen: set[int] = set()
    saved = 0

    def pack(tensor):
        nonlocal saved
        key = tensor.untyped_storage().data_ptr()
        if not isinstance(tensor, torch.nn.Parameter) and key not in seen:  # parameters: counted apart
            seen.add(key)
            saved += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = v.forward()
    del loss
    grads = sum(p.numel() * p.element_size() for p in v.parameters)
    adam = 2 * grads
    return saved + grads + adam


def module_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class NetworkTimer:
    """Wraps a module's ``forward`` to add up the seconds spent inside it."""

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        inner = module.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        module.forward = timed


def bookkeeping(mc: MonteCLoRA, v: Variant, reps: int) -> tuple[float, float, float]:
    """Median seconds of (bookkeeping in the forward, the whole step, the network forward)."""
    timer = NetworkTimer(mc.model.network)
    book, steps, nets = [], [], []
    for _ in range(reps):
        timer.seconds = 0.0
        start = time.perf_counter()
        loss = v.forward()
        forward_seconds = time.perf_counter() - start
        net = timer.seconds
        _finish(loss, v.parameters, v.optimizer)
        steps.append(time.perf_counter() - start)
        book.append(forward_seconds - net)
        nets.append(net)
    del mc.model.network.forward  # restore the class's forward
    return statistics.median(book), statistics.median(steps), statistics.median(nets)


@torch.no_grad()
def predictive_cost(mc: MonteCLoRA, batch: dict, reps: int, draws: int = common.NUM_DRAWS) -> tuple[float, str]:
    mc.eval()
    inputs = common._inputs(batch)
    try:
        from pyro_monteclora.prediction.predictive import Predictive

        predictive = Predictive(mc, num_samples=draws, seed=0)
        posterior, how = (lambda: predictive(batch)), "Predictive"
    except ImportError:
        posterior, how = (lambda: [mc.sample_logits(batch) for _ in range(draws)]), "8 x sample_logits"

    def plain():
        return [mc.network(**inputs).logits for _ in range(draws)]

    posterior(), plain()
    ratios = []
    for _ in range(reps):
        start = time.perf_counter()
        plain()
        middle = time.perf_counter()
        posterior()
        ratios.append((time.perf_counter() - middle) / (middle - start))
    mc.train()
    return statistics.median(ratios), how


# ------------------------------------------------------------------------------------- driver
def compare(label: str, make_base, batch: dict, causal: bool, reps: int, lines: list[str]) -> None:
    variants, mcs, frozen_bytes = [], {}, []
    for name, variant in (("lora", False), ("peft_mc", True)):
        base = make_base()
        variants.append(peft_variant(name, base, batch, variant, causal))
        frozen_bytes.append(module_bytes(base) - sum(p.numel() * p.element_size() for p in variants[-1].parameters))
    for name, overrides in (("ours", {}), ("ours_collapsed", {"collapse_components": True})):
        base = make_base()
        v, mc = ours_variant(name, base, batch, **overrides)
        variants.append(v)
        mcs[name] = mc
        frozen_bytes.append(module_bytes(mc) - sum(p.numel() * p.element_size() for p in v.parameters))
    times = interleaved_times(variants, reps)
    memory = {v.name: training_memory(v) + frozen for v, frozen in zip(variants, frozen_bytes)}
    lines.append(f"\n### {label}\n")
    lines.append(f"batch: {tuple(batch['input_ids'].shape)} tokens; {reps} interleaved repetitions; "
                 f"ratios are medians of per-repetition ratios to plain LoRA.\n")
    lines.append("| method | median step (ms) | step / LoRA | training memory (MiB) | memory / LoRA |")
    lines.append("|---|---|---|---|---|")
    for v in variants:
        lines.append(
            f"| {v.name} | {1000 * statistics.median(times[v.name]):.1f} | {ratio(times, v.name, 'lora'):.3f} "
            f"| {memory[v.name] / 2**20:.1f} | {memory[v.name] / memory['lora']:.3f} |"
        )
    cost, how = predictive_cost(mcs["ours"], batch, max(3, reps // 2))
    lines.append(f"\nPosterior predictive, S = 8 draws ({how}) / 8 plain forwards: **{cost:.2f}x**")
    book, step, net = bookkeeping(mcs["ours"], _ours(variants), max(3, reps // 2))
    lines.append(
        f"\nPyro bookkeeping in a pyro_monteclora step (forward minus network forward): "
        f"{1000 * book:.1f} ms of {1000 * step:.1f} ms = **{100 * book / step:.1f}%**"
    )


def _ours(variants: list[Variant]) -> Variant:
    return next(v for v in variants if v.name == "ours")


def growth(reps: int, lines: list[str]) -> None:
    """Bookkeeping ms vs number of adapted layers (q_proj + v_proj of 1, 4, 16 Llama blocks)."""
    lines.append("\n### Pyro bookkeeping vs adapted layers (random Llama, hidden 256, q_proj + v_proj)\n")
    lines.append("| adapted layers | group_layers | sample sites | bookkeeping (ms) | network forward (ms) | step (ms) | bookkeeping / step |")
    lines.append("|---|---|---|---|---|---|---|")
    batch = batch_for("llama", 2, 32)
    for blocks in (1, 4, 16):
        for grouped in (True, False):
            base = llama(num_layers=blocks, hidden=256)
            v, mc = ours_variant("ours", base, batch, target_modules=["q_proj", "v_proj"], group_layers=grouped)
            for _ in range(2):
                v.step()
            book, step, net = bookkeeping(mc, v, reps)
            sites = 3 * len(mc.groups)
            lines.append(
                f"| {2 * blocks} | {grouped} | {sites} | {1000 * book:.2f} | {1000 * net:.1f} | {1000 * step:.1f} | {100 * book / step:.1f}% |"
            )
            print(lines[-1], flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 4 if args.quick else args.reps
    command = "python -m benchmarks.overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Overhead: pyro_monteclora vs peft LoRA vs peft's MonteCLoRA variant",
        "",
        f"Command: `{command.strip()}`; date: {datetime.date.today()}; torch {torch.__version__}, "
        f"{args.threads} CPU thread(s), machine shared with other jobs (ratios, not absolute times, are the result).",
        "LoRA r=16, alpha=32, dropout 0.05, all-linear; pyro_monteclora defaults (N=4, exact components) and "
        "`collapse_components=True`.",
    ]
    compare("MiniLM (all-MiniLM-L6-v2, 36 adapted layers), 64-token sequences", minilm,
            batch_for("minilm", 32, 64), False, reps, lines)
    print("\n".join(lines), flush=True)
    compare("MiniLM, 8-token sequences (the shape of a VADER training batch)", minilm,
            batch_for("minilm", 32, 8), False, reps, lines)
    compare("Random-init Llama (hidden 1024, 4 blocks, 28 adapted layers)", lambda: llama(4, 1024),
            batch_for("llama", 2, 128), True, max(3, reps // 2), lines)
    print("\n".join(lines[-20:]), flush=True)
    growth(max(3, reps // 2), lines)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "overhead.md"), "w", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
