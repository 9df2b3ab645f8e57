"""Multiple-choice scoring speed: ours (mean adapter and S = 8 posterior predictive) against lm-eval's HFLM.

Issue #24's three ratios, measured in one run on SmolLM2-135M-Instruct with 2 torch threads:

- four-choice ARC-Easy rows (200 test questions): our mean-mode time / HFLM's (target <= 0.5);
- two-choice rows with long options (200): the same ratio (target <= 1.0);
- our S = 8 posterior predictive / our mean mode on the ARC rows (target <= 8.5).

There is no PIQA in ``../shared/data``; the two-choice rows are built from ARC-Easy to have PIQA's
shape (a short shared context, two long continuations): the context is ``"Question: Which statement
is true?\\nAnswer:"`` and each choice is a question followed by its right or a wrong answer (about
25 tokens each). Both sides score the same requests with the same batch size (16 sequences); HFLM
gets the peft network of the same MonteCLoRA object. Each configuration runs once to warm up, then
``--repeats`` times; the ratios use the median times. Tokens per second count the tokens each
forward pass computes (context once per row for ours, once per request for HFLM) and are compared
with the machine's matmul throughput (a 2048 x 2048 float32 matmul on the same threads): a forward
pass costs about ``2 x parameters`` flops per token, which bounds the tokens per second.

    python -m benchmarks.choice_speed            # about 10 minutes on 2 cores

Writes ``benchmarks/results/choice_speed.md`` (with the command and date) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

from pyro_monteclora import MonteCLoRA
from pyro_monteclora.data.choices import continuations, context, load_choice_rows
from pyro_monteclora.examples import load_smollm2
from pyro_monteclora.prediction.choices import choice_examples, score_choices
from pyro_monteclora.quiet import quiet

DATA = os.path.join("..", "shared", "data", "commonsense", "ARC-Easy", "test.json")
OUT = os.path.join("benchmarks", "results", "choice_speed.md")


def arc_rows(n: int) -> list[dict]:
    return [r for r in load_choice_rows(DATA) if len(r["choices"]) == 4][:n]


def long_option_rows(n: int) -> list[dict]:
    """PIQA-shaped rows from ARC-Easy: a short shared context, two long continuations."""
    rows = []
    for i, r in enumerate(arc_rows(n)):
        wrong = r["choices"][(r["label"] + 1 + i % 3) % 4]
        right = r["choices"][r["label"]]
        pair = [f"{r['question']} {right}", f"{r['question']} {wrong}"]
        rows.append({"question": "Which statement is true?", "choices": pair[:: 1 if i % 2 == 0 else -1],
                     "label": i % 2})
    return rows


def matmul_gflops(threads: int, size: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def harness_requests(rows: list[dict]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, (context(r), c), i) for i, r in enumerate(rows) for c in continuations(r)]


def computed_tokens(rows: list[dict], tokenizer, shared: bool) -> int:
    """Tokens a forward pass computes: each row's context once (ours) or once per choice (HFLM)."""
    examples = choice_examples(tokenizer, rows)
    total, start = 0, 0
    for r in rows:
        group = examples[start : start + len(r["choices"])]
        start += len(r["choices"])
        lengths = [len(e["input_ids"]) for e in group]
        if shared:
            prefix = 0
            while prefix < min(lengths) - 1 and all(e["input_ids"][prefix] == group[0]["input_ids"][prefix] for e in group):
                prefix += 1
            total += prefix + sum(n - prefix for n in lengths)
        else:
            total += sum(lengths)
    return total


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200, help="rows per set (default 200)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass, both sides")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    with quiet():
        model, tokenizer = load_smollm2()
        mc = MonteCLoRA.from_model(model, lora_r=16, tokenizer=tokenizer).eval()
        hflm = HFLM(pretrained=mc.network, tokenizer=tokenizer, batch_size=args.batch_size)
    gflops = matmul_gflops(args.threads)
    parameters = sum(p.numel() for p in model.parameters())
    limit = gflops * 1e9 / (2 * parameters)
    sets = {"ARC-Easy, 4 choices": arc_rows(args.rows), "long options, 2 choices": long_option_rows(args.rows)}
    rows_out, figures = [], {}
    for name, rows in sets.items():
        requests = harness_requests(rows)
        with quiet():
            theirs = timed(lambda: hflm.loglikelihood(requests, disable_tqdm=True), args.repeats)
            mean = timed(lambda: score_choices(mc, rows, mode="mean", batch_size=args.batch_size), args.repeats)
            sampled = timed(lambda: score_choices(mc, rows, num_samples=8, batch_size=args.batch_size), args.repeats) \
                if name.startswith("ARC") else None
        ours_tokens, their_tokens = computed_tokens(rows, tokenizer, True), computed_tokens(rows, tokenizer, False)
        figures[name] = {"hflm_s": theirs, "mean_s": mean, "s8_s": sampled, "ratio": mean / theirs,
                         "s8_ratio": sampled / mean if sampled else None}
        rows_out.append(
            f"| {name} | {len(rows)} | {mean / theirs:.2f} | {f'{sampled / mean:.2f}' if sampled else '-'} | "
            f"{ours_tokens / mean:.0f} | {their_tokens / theirs:.0f} | {limit:.0f} |"
        )
    command = "python -m benchmarks.choice_speed " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        "# Multiple-choice scoring speed against lm-eval's HFLM",
        "",
        f"`{command.strip()}`, {datetime.date.today().isoformat()}, SmolLM2-135M-Instruct (float32), "
        f"{args.threads} torch threads, batch {args.batch_size} sequences on both sides, median of "
        f"{args.repeats} timed runs after a warm-up. Ratios are from one run; absolute times are not reported.",
        "",
        "| rows | n | ours (mean adapter) / HFLM | ours S = 8 / ours mean | ours tokens/s | HFLM tokens/s | "
        "matmul bound tokens/s |",
        "|---|---|---|---|---|---|---|",
        *rows_out,
        "",
        f"Targets (issue #24): mean / HFLM <= 0.5 on four-choice ARC-Easy rows and <= 1.0 on two-choice rows with "
        f"long options; S = 8 <= 8.5x the mean mode. The matmul bound is {gflops:.0f} GFLOP/s (a 2048 x 2048 "
        f"float32 matmul) over 2 x {parameters / 1e6:.1f}M flops per token; tokens/s count the tokens each side "
        "computes (ours: each row's context once; HFLM: once per choice).",
        "",
    ])
    print(report)
    if not args.no_write:
        with open(OUT, "w", encoding="utf-8") as handle:
            handle.write(report)
    return figures


if __name__ == "__main__":
    main()
