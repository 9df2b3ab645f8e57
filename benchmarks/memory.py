"""Peak CPU memory of a few training steps: full fine-tune, LoRA, MonteCLoRA, MonteCLoRA + int8 base.

Each configuration runs in its own process (so peaks do not mix): load the model, build the
method, run ``--steps`` AdamW steps on random token batches, and report the process's peak
resident set size (``ru_maxrss``) minus the RSS measured right after the imports, i.e. what the
model, its gradients, optimizer state and activations added. Writes a Markdown table.

    OMP_NUM_THREADS=1 python -m benchmarks.memory --output docs/memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

METHODS = ("full", "lora", "monteclora", "monteclora-int8")
MODELS = ("minilm", "llama")


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(model_name: str, method: str, steps: int, batch: int, length: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from pyro_monteclora import MonteCLoRA, MonteCLoRAConfig
    from pyro_monteclora.examples import minilm_path
    from pyro_monteclora.quantization import quantize_base
    from pyro_monteclora.testing import tiny_llama
    from pyro_monteclora.train.elbo import ELBOLoss

    torch.manual_seed(0)
    baseline = _rss_mib()
    if model_name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        vocab = model.config.vocab_size
    else:
        model = tiny_llama(vocab_size=32000, hidden_size=512, num_layers=4)
        vocab = 32000
    parameters = sum(p.numel() for p in model.parameters())
    config = MonteCLoRAConfig(lora_r=16, lora_alpha=32)
    if method.endswith("int8"):
        quantize_base(model, "int8")
    ids = torch.randint(5, vocab, (batch, length))
    batch_dict = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_name == "minilm":
        batch_dict["labels"] = torch.randint(0, 2, (batch,))
    else:
        batch_dict["labels"] = ids.clone()
    if method == "full":
        trainable = list(model.parameters())
        loss_fn = lambda: model(**batch_dict).loss  # noqa: E731
    elif method == "lora":
        task = "SEQ_CLS" if model_name == "minilm" else "CAUSAL_LM"
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type=task))
        trainable = [p for p in model.parameters() if p.requires_grad]
        loss_fn = lambda: model(**batch_dict).loss  # noqa: E731
    else:
        mc = MonteCLoRA.from_model(model, config)
        objective = ELBOLoss(mc.model, mc.guide, config.kl_weight, config.cooperative_weight)
        trainable = mc.trainable_parameters()
        loss_fn = lambda: objective(batch_dict, 1000).loss  # noqa: E731
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {
        "model": model_name,
        "method": method,
        "parameters": parameters,
        "trainable": sum(p.numel() for p in trainable),
        "baseline_mib": baseline,
        "peak_mib": _peak_mib(),
        "added_mib": _peak_mib() - baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--output", default=None, help="Markdown file to write (default: print only).")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.batch_size, args.length)))
        return
    rows = []
    for model in MODELS:
        for method in METHODS:
            out = subprocess.run(
                [sys.executable, __file__, "--one", model, method, "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size), "--length", str(args.length)],
                capture_output=True, text=True, check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    lines = [
        "| model | method | parameters | trainable | peak RSS (MiB) | added over imports (MiB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['parameters'] / 1e6:.1f} M | {r['trainable'] / 1e6:.2f} M "
            f"| {r['peak_mib']:.0f} | {r['added_mib']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.output:
        command = (
            f"OMP_NUM_THREADS=1 python -m benchmarks.memory --steps {args.steps} --batch-size {args.batch_size} "
            f"--length {args.length} --output {args.output}"
        )
        text = DOC.format(table=table, command=command, steps=args.steps, batch=args.batch_size, length=args.length)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(text)


DOC = """# Memory of MonteCLoRA training on the CPU

Produced by

```
{command}
```

What is measured: each row is a separate Python process that loads the model, builds the method,
and runs {steps} AdamW steps on random batches of {batch} sequences of {length} tokens (fp32,
CPU). *Peak RSS* is the process's maximum resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`):
it includes the Python interpreter, torch, transformers and pyro (about the baseline measured
right after the imports). *Added over imports* is the peak minus that baseline: the model
weights, gradients, optimizer state and activations. RSS is coarse (allocator caching, shared
pages) and varies by some MiB between runs; compare rows of one model.

- `full`: every parameter trained (no adapter), AdamW.
- `lora`: stock peft LoRA (r = 16, alpha = 32, all linear layers), plain cross-entropy loss.
- `monteclora`: the same LoRA with MonteCLoRA (N = 4 components), trained on the negative ELBO
  (one posterior draw per step).
- `monteclora-int8`: as `monteclora`, with the base linear layers quantized to int8 by
  optimum-quanto (`quantization="int8"` on the CPU) before the adapter is attached.

Models: `minilm` is the packaged all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) with a 2-class
head; `llama` is a small random Llama (`tiny_llama(vocab_size=32000, hidden_size=512,
num_layers=4)`).

{table}
"""


if __name__ == "__main__":
    main()
