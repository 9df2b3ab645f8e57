"""SmolLM2-135M-Instruct zero-shot on the commonsense test sets, scored as lm-evaluation-harness scores them.

Before building on an LLM figure, check the model is above chance on it and that our scoring
equals the field's tool on the same rows. For ARC-Easy, OpenBookQA and BoolQ (the paper's
instruction rows converted by ``pyro_monteclora.data.choices``: lm-eval's ``"Question: q\\nAnswer:"``
+ ``" choice"``; BoolQ as no/yes, without its passage, which the shared copy lacks) this prints
and writes, for the whole test set, ``evaluate``'s mean-adapter accuracy, accuracy_norm, NLL and
ECE beside chance (the share of the most frequent label for BoolQ, 1/K otherwise) and the uniform
prediction's NLL; and, on the first ``--check-rows`` rows of each, lm-eval's HFLM acc / acc_norm
and the largest difference of a choice's log-likelihood.

    python -m benchmarks.zero_shot_llm            # about 15 minutes on 2 cores

Writes ``benchmarks/results/zero_shot_llm.md`` (command and date).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

import torch

from pyro_monteclora import MonteCLoRA, evaluate
from pyro_monteclora.data.choices import continuations, context, load_choice_rows
from pyro_monteclora.examples import load_smollm2
from pyro_monteclora.prediction.choices import score_choices
from pyro_monteclora.quiet import quiet

DATA = os.path.join("..", "shared", "data", "commonsense")
TASKS = ("ARC-Easy", "openbookqa", "boolq")
OUT = os.path.join("benchmarks", "results", "zero_shot_llm.md")


def hflm_check(hflm, mc, rows: list[dict]) -> tuple[float, float, float, float, float]:
    """lm-eval's acc and acc_norm on ``rows``, ours on the same rows, and the largest |our - its| log-likelihood."""
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, (context(r), c), i) for i, r in enumerate(rows) for c in continuations(r)]
    theirs = iter(ll for ll, _ in hflm.loglikelihood(requests, disable_tqdm=True))
    ours = score_choices(mc, rows, mode="mean")["sample_log_likelihood"][0].double()
    hits = torch.zeros(4, dtype=torch.float64)  # their acc, acc_norm; our acc, acc_norm
    difference = 0.0
    for i, row in enumerate(rows):
        lls = torch.tensor([next(theirs) for _ in row["choices"]], dtype=torch.float64)
        mine = ours[i, : len(lls)]
        lengths = torch.tensor([float(len(c)) for c in row["choices"]], dtype=torch.float64)
        picks = [lls.argmax(), (lls / lengths).argmax(), mine.argmax(), (mine / lengths).argmax()]
        hits += torch.tensor([float(int(p) == row["label"]) for p in picks], dtype=torch.float64)
        difference = max(difference, float((lls - mine).abs().max()))
    return (*(hits / len(rows)).tolist(), difference)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=0, help="test rows per task (default 0: all)")
    parser.add_argument("--check-rows", type=int, default=200, help="rows compared with lm-eval's HFLM (default 200)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    with quiet():
        model, tokenizer = load_smollm2()
        mc = MonteCLoRA.from_model(model, lora_r=16, tokenizer=tokenizer).eval()  # B = 0: the base model itself
        hflm = HFLM(pretrained=mc.network, tokenizer=tokenizer, batch_size=16)
    lines = []
    for task in TASKS:
        rows = load_choice_rows(os.path.join(DATA, task, "test.json"))
        rows = rows[: args.rows] if args.rows else rows
        with quiet():
            metrics = evaluate(mc, rows, num_samples=1, batch_size=32)["mean"]
            acc, acc_norm, our_acc, our_acc_norm, difference = hflm_check(hflm, mc, rows[: args.check_rows])
        counts = torch.bincount(torch.tensor([r["label"] for r in rows])).double()
        chance = float(counts.max() / counts.sum()) if task == "boolq" else float(torch.tensor(
            [1 / len(r["choices"]) for r in rows]).mean())
        uniform = float(torch.tensor([math.log(len(r["choices"])) for r in rows]).mean())
        lines.append(
            f"| {task} | {len(rows)} | {metrics['accuracy']:.3f} | {metrics['accuracy_norm']:.3f} | {chance:.3f} | "
            f"{metrics['nll']:.3f} | {uniform:.3f} | {metrics['ece']:.3f} | {our_acc:.3f} / {our_acc_norm:.3f} | "
            f"{acc:.3f} / {acc_norm:.3f} | {difference:.1e} |"
        )
        print(lines[-1], flush=True)
    command = "python -m benchmarks.zero_shot_llm " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        "# SmolLM2-135M-Instruct zero-shot, scored as lm-evaluation-harness scores it",
        "",
        f"`{command.strip()}`, {datetime.date.today().isoformat()}; torch {torch.__version__}, {args.threads} threads. "
        "Context `\"Question: {question}\\nAnswer:\"`, continuation `\" \" + choice`, no EOS; `acc` from the summed "
        "log-likelihood, `acc_norm` from it divided by the choice's length in characters. NLL and ECE (15 bins) of "
        "the softmax over the choices' summed log-likelihoods. Chance: 1/K (BoolQ: its most frequent answer). "
        f"lm-eval's HFLM (0.4.x, the same model object) scored the first {args.check_rows} rows of each set.",
        "",
        "| task | rows | acc | acc_norm | chance | NLL | uniform NLL | ECE | first rows: ours acc / acc_norm | "
        "first rows: HFLM acc / acc_norm | max abs diff of a choice's log-likelihood |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ])
    print(report)
    with open(OUT, "w", encoding="utf-8") as handle:
        handle.write(report)


if __name__ == "__main__":
    main()
