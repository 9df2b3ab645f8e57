"""SmolLM2-135M-Instruct fine-tuned on commonsense questions, offline, on a CPU: zero-shot vs fine-tuned.

The default (``--format choices``) is the way lm-evaluation-harness scores small LMs: each question
``"Question: q\nAnswer:"`` is followed by every choice ``" " + choice``; the model's probability of
a choice is the softmax over the choices' summed log-likelihoods (``acc``; ``acc_norm`` divides
them by each choice's length in characters). Training is by the multiple-choice likelihood (the
label observed from that softmax; ``--likelihood sft``: SFT on the right continuation) on rows
``question``/``choices``/``label``, converted from the paper's instruction rows in
``../shared/data/commonsense``. It prints, on held-out test questions: zero-shot, the fine-tuned
mean adapter (plain LoRA), the mean adapter + temperature scaling (one temperature fitted on
validation questions carved from the training set), and the posterior predictive (S draws):
accuracy, acc_norm, NLL, ECE (15 bins) and AURC. The defaults (ARC-Easy, 400 training questions
x 2 epochs, 200 test questions) take about ten minutes on 2 CPU cores::

    python examples/commonsense_llm.py [--likelihood choices|sft] [--tasks ARC-Easy openbookqa] [--train 400]

``--format labels`` is the paper's own format: the instruction lists the options and the model is
trained to write ``"the correct answer is answer2"``; the candidates are the labels
``answer1..4``. SmolLM2-135M is at chance that way (ARC-Easy 24%; the figures are in
``benchmarks/results/commonsense_llm.md``), which is why the default scores the choices' texts.
With ``--format labels`` the script also runs the paper's greedy generation with answer extraction.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time

import torch

import pyro_monteclora
from pyro_monteclora import MonteCLoRA
from pyro_monteclora.calibration import calibration_metrics, fit_temperature, temperature_scale
from pyro_monteclora.data.choices import load_choice_rows
from pyro_monteclora.prediction.choices import choice_predictive, score_choices
from pyro_monteclora.prediction.evaluation import predictive_outputs
from pyro_monteclora.examples import load_smollm2
from pyro_monteclora.prediction.generation import generate_answers
from pyro_monteclora.quiet import quiet
from pyro_monteclora.prediction.scoring import instruction_choices, multiple_choice
from pyro_monteclora.prediction.uncertainty import selective_prediction

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "commonsense")
TASKS = ("openbookqa", "ARC-Easy", "boolq")
GENERATION_TASK = "ARC-Easy"


def rows(task: str, split: str, n: int, seed: int) -> list[dict]:
    """``n`` rows of a task (seeded choice), with as many answers as the task's usual questions."""
    with open(os.path.join(DATA, task, f"{split}.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    width = 2 if task == "boolq" else 4
    data = [r for r in data if r["instruction"].rsplit("Answer format:", 1)[-1].count("/") == width - 1]
    return random.Random(seed).sample(data, n)


def spelled_out(row: dict) -> tuple[dict, list[str], int]:
    """The row with its answer written as the option's text, the candidates and the right one's index."""
    candidates, label = instruction_choices(row)
    body = row["instruction"].split("\n\n")
    options = re.split(r"Answer\d+:\s*", body[1])[1:] if len(body) > 2 and "Answer1:" in body[1] else None
    if options is None:  # true/false questions: the answer already is its text
        return row, candidates, label
    prefix = row["output"][: len(row["output"]) - len(row["answer"])]
    texts = [prefix + option.strip() for option in options]
    return {**row, "output": texts[label]}, texts, label


def scores(model, tests, tokenizer, num_samples, seed, answers) -> dict:
    """Per task: mean-adapter (and, with ``num_samples``, posterior-predictive) multiple-choice metrics."""
    out = {}
    for task, test in tests.items():
        out[task] = {}
        for name, mode, samples in (("mean", "mean", 0), ("predictive", "sample", num_samples)):
            if samples == 0 and name == "predictive":
                continue
            if answers == "labels":
                o = predictive_outputs(model, test, samples, mode, batch_size=16, seed=seed, tokenizer=tokenizer)
                probs, labels = o["probs"], o["labels"]
            else:
                triples = [spelled_out(r) for r in test]
                probs = multiple_choice(model, [r for r, _, _ in triples], [c for _, c, _ in triples], samples, seed,
                                        mode, tokenizer, batch_size=16)["probs"]
                labels = torch.tensor([label for _, _, label in triples])
            out[task][name] = calibration_metrics(probs, labels)
    return out


def pick(rows: list[dict], size: int, seed: int, skip: int = 0) -> list[dict]:
    """``size`` rows after the first ``skip`` of a seeded permutation (disjoint slices for disjoint splits)."""
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    return [rows[i] for i in order[skip : skip + size]]


def choice_metrics(scores: dict, temperature: float = 1.0) -> dict:
    """Accuracy, acc_norm, NLL, Brier, ECE and AURC of scored multiple-choice rows (optionally temperature-scaled)."""
    out = choice_predictive(scores)
    probs = temperature_scale(out["probs"], temperature) if temperature != 1.0 else out["probs"]
    labels = scores["labels"]
    return {**calibration_metrics(probs, labels), "accuracy_norm": float((out["prediction_norm"] == labels).double().mean()),
            "aurc": selective_prediction(probs, labels)["aurc"]}


def run_choices(args: argparse.Namespace) -> None:
    """The default: lm-eval's scoring of the choices' texts, trained by the multiple-choice likelihood
    (``--likelihood sft``: SFT on the right continuation)."""
    start = time.perf_counter()
    with quiet():
        base, tokenizer = load_smollm2()
    train, val, tests = [], [], {}
    for task in args.tasks:
        rows = load_choice_rows(os.path.join(DATA, task, "train.json"))
        train += pick(rows, args.train // len(args.tasks), args.seed)
        val += pick(rows, args.val // len(args.tasks), args.seed, skip=args.train // len(args.tasks))
        tests[task] = pick(load_choice_rows(os.path.join(DATA, task, "test.json")), args.test, args.seed + 1)
    random.Random(args.seed).shuffle(train)
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.0f} s; {len(train)} training questions, "
          f"{len(val)} validation questions (from the training sets), {args.test} test questions per task", flush=True)

    with torch.random.fork_rng():  # zero-shot: an untrained adapter (B = 0) is the base model
        zero = MonteCLoRA.from_model(base, lora_r=16, tokenizer=tokenizer)
    zero_shot = {task: choice_metrics(score_choices(zero, rows, mode="mean")) for task, rows in tests.items()}
    base = zero.network.unload()
    how = "the multiple-choice likelihood" if args.likelihood == "choices" else "SFT on the right continuation"
    print(f"zero-shot scored at {time.perf_counter() - start:.0f} s; training ({how}):", flush=True)
    # gradient checkpointing is on by default for causal LMs; a 135M model on a CPU is not short of
    # memory, so it is turned off to save its ~40% recompute
    result = pyro_monteclora.train(
        base, train, tokenizer=tokenizer, num_epochs=args.epochs, batch_size=8, learning_rate=args.learning_rate,
        seed=args.seed, max_length=128, gradient_checkpointing=False, eval_every_epoch=False,
        task="multiple_choice" if args.likelihood == "choices" else "causal_lm",
    )
    model = result.model
    temperature = fit_temperature(choice_predictive(score_choices(model, val, mode="mean"))["probs"],
                                  torch.tensor([r["label"] for r in val]))
    print(f"trained {len(result.history)} steps by {time.perf_counter() - start:.0f} s; temperature fitted on "
          f"validation: {temperature:.2f}", flush=True)
    print(f"\n{'task':<12}{'model':<36}{'acc':>7}{'acc_norm':>10}{'NLL':>8}{'ECE':>8}{'AURC':>8}")
    for task, rows in tests.items():
        mean = score_choices(model, rows, mode="mean")
        predictive = score_choices(model, rows, num_samples=args.num_samples, seed=args.seed)
        lines = [("zero-shot", zero_shot[task]), ("fine-tuned, mean adapter (LoRA)", choice_metrics(mean)),
                 (f"mean adapter + temperature {temperature:.2f}", choice_metrics(mean, temperature)),
                 (f"posterior predictive, S = {args.num_samples}", choice_metrics(predictive))]
        for label, m in lines:
            print(f"{task:<12}{label:<36}{m['accuracy']:>7.3f}{m['accuracy_norm']:>10.3f}{m['nll']:>8.3f}"
                  f"{m['ece']:>8.3f}{m['aurc']:>8.3f}")
    print(f"\nuniform guessing over 4 choices: NLL {math.log(4):.3f}; total {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("choices", "labels"), default="choices",
                        help="choices: lm-eval's scoring (default); labels: the paper's answer1..K format")
    parser.add_argument("--likelihood", choices=("choices", "sft"), default="choices",
                        help="(choices) train by the multiple-choice likelihood (default) or by SFT on the right answer")
    parser.add_argument("--tasks", nargs="+", default=["ARC-Easy"], choices=TASKS, help="(choices) tasks to train on")
    parser.add_argument("--train", type=int, default=400, help="(choices) training questions, over all tasks")
    parser.add_argument("--val", type=int, default=100, help="(choices) validation questions for the temperature")
    parser.add_argument("--test", type=int, default=200, help="(choices) test questions per task")
    parser.add_argument("--train-per-task", type=int, default=120, help="(labels) training rows per task")
    parser.add_argument("--test-per-task", type=int, default=50, help="(labels) test questions per task")
    parser.add_argument("--answers", choices=("labels", "texts"), default="labels", help="(labels) answer spelling")
    parser.add_argument("--epochs", type=int, default=None, help="default: 2 (choices), 1 (labels)")
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: 5e-4 (choices), 1e-3 (labels)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    choices = args.format == "choices"
    args.epochs = args.epochs or (2 if choices else 1)
    args.learning_rate = args.learning_rate or (5e-4 if choices else 1e-3)
    run_choices(args) if choices else run_labels(args)


def run_labels(args: argparse.Namespace) -> None:
    """The paper's label format (``--format labels``), with greedy generation on ARC-Easy."""
    start = time.perf_counter()

    with quiet():
        base, tokenizer = load_smollm2()
    train = [r for t in TASKS for r in rows(t, "train", args.train_per_task, args.seed)]
    if args.answers == "texts":
        train = [spelled_out(r)[0] for r in train]
    random.Random(args.seed).shuffle(train)
    tests = {t: rows(t, "test", args.test_per_task, args.seed + 1) for t in TASKS}
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.0f} s; {len(train)} training rows "
          f"({args.train_per_task} per task), {args.test_per_task} test questions per task", flush=True)

    # zero-shot: the base model itself (an untrained adapter: B = 0, so the mean adapter is the base)
    with torch.random.fork_rng():
        zero = MonteCLoRA.from_model(base, lora_r=16)
    zero_shot = scores(zero, tests, tokenizer, 0, args.seed, args.answers)
    generation = args.answers == "labels"  # the paper's evaluation extracts the label it was trained to write
    zero_generated = generate_answers(zero, tests[GENERATION_TASK], tokenizer, max_new_tokens=12) if generation else None
    base = zero.network.unload()  # the plain base again, for training
    print(f"zero-shot done at {time.perf_counter() - start:.0f} s", flush=True)

    # gradient checkpointing is on by default for causal LMs; on a CPU with a 135M model memory
    # is not the limit, so it is turned off to save its ~40% recompute
    result = pyro_monteclora.train(
        base, train, tokenizer=tokenizer, num_epochs=args.epochs, batch_size=8, learning_rate=args.learning_rate,
        seed=args.seed, max_length=256, gradient_checkpointing=False, eval_every_epoch=False,
    )
    trained = time.perf_counter() - start
    tuned = scores(result.model, tests, tokenizer, args.num_samples, args.seed, args.answers)
    generated = generate_answers(result.model, tests[GENERATION_TASK], tokenizer, max_new_tokens=12) if generation else None

    print(f"\ntrained {len(result.history)} steps (batch 8) by {trained:.0f} s; multiple-choice scoring, "
          f"{args.test_per_task} test questions per task, answers as {args.answers} (S = {args.num_samples} for the predictive)")
    print(f"{'task':<12}{'model':<26}{'accuracy':>9}{'NLL':>8}{'Brier':>8}{'ECE':>8}")
    for task in TASKS:
        lines = [("zero-shot", zero_shot[task]["mean"]), ("fine-tuned, mean adapter", tuned[task]["mean"]),
                 ("fine-tuned, predictive", tuned[task]["predictive"])]
        for label, m in lines:
            print(f"{task:<12}{label:<26}{m['accuracy']:>9.3f}{m['nll']:>8.3f}{m['brier']:>8.3f}{m['ece']:>8.3f}")
        gain = 100 * (tuned[task]["mean"]["accuracy"] - zero_shot[task]["mean"]["accuracy"])
        print(f"{task:<12}{'fine-tuning gain':<26}{gain:>+8.1f} points")
    if not generation:
        print(f"\ntotal {time.perf_counter() - start:.0f} s")
        return
    print(f"\ngreedy generation + answer extraction on {GENERATION_TASK} (the paper's evaluation):")
    print(f"  zero-shot   accuracy {zero_generated['accuracy']:.3f} (an allowed answer in {zero_generated['answered']:.0%} of the responses)")
    print(f"  fine-tuned  accuracy {generated['accuracy']:.3f} (an allowed answer in {generated['answered']:.0%}); "
          f"e.g. {generated['responses'][0]!r}")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
