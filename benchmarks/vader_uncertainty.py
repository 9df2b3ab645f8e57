"""Does MonteCLoRA's predictive uncertainty track human disagreement? MiniLM on VADER words.

Fine-tunes the packaged all-MiniLM-L6-v2 with a MonteCLoRA adapter on VADER lexicon words
(label: sign of the mean rating), then on held-out words compares the mean adapter with the
posterior predictive (accuracy, NLL, ECE, Brier) and reports the Spearman rank correlation of
the predictive entropy and of the mutual information with the raters' standard deviation
(``rating_std``) and with ``-|mean_rating|`` (how close to neutral a word is).

Run (about 2-3 minutes on 2 CPU threads)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.vader_uncertainty --train-size 3000 --epochs 2 \\
        --diagram docs/images/reliability_vader.png --timing
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyro_monteclora import train
from pyro_monteclora.calibration import calibration_metrics, rank_correlation, reliability_diagram
from pyro_monteclora.data import pad_token_id
from pyro_monteclora.prediction.evaluation import evaluation_outputs
from pyro_monteclora.examples import load_vader, minilm_path
from pyro_monteclora.inspection import format_summary, summary
from pyro_monteclora.data import batches
from pyro_monteclora.prediction.predictive import Predictive


def timing(monteclora, tokenizer, texts, num_samples: int, repeats: int) -> dict[str, float]:
    """Median seconds of one predictive call on a batch, vectorized and as a loop of forwards."""
    encoded = tokenizer(texts, truncation=True, max_length=monteclora.monteclora_config.max_length)
    examples = [{k: encoded[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
                for i in range(len(texts))]
    batch = next(batches(examples, pad_token_id(tokenizer), len(examples)))
    result = {}
    for name, vectorize in (("vectorized", True), ("loop", False)):
        predictive = Predictive(monteclora, num_samples, seed=0, vectorize=vectorize)
        predictive(batch)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predictive(batch)
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--sample-scaler", type=float, default=None, help="epsilon (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--diagram", default=None, help="write the predictive's reliability diagram here (PNG)")
    parser.add_argument("--timing", action="store_true", help="also time vectorized vs looped draws")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = load_vader(seed=args.seed, test_size=args.test_size, train_size=args.train_size)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    overrides = {} if args.sample_scaler is None else {"sample_scaler": args.sample_scaler}
    start = time.perf_counter()
    result = train(model, data["train"], tokenizer=tokenizer, num_epochs=args.epochs, batch_size=args.batch_size,
                   seed=args.seed, progress=False, eval_every_epoch=False, **overrides)
    train_seconds = time.perf_counter() - start
    monteclora = result.model
    test = data["test"]
    start = time.perf_counter()
    outputs = evaluation_outputs(monteclora, test, num_samples=args.num_samples, batch_size=args.batch_size,
                                 seed=args.seed, tokenizer=tokenizer)
    eval_seconds = time.perf_counter() - start
    labels = outputs["labels"]
    std = torch.tensor(test["rating_std"])
    neutral = -torch.tensor(test["mean_rating"]).abs()

    print(f"MiniLM + MonteCLoRA on VADER: {args.train_size} train words, {args.epochs} epochs "
          f"({train_seconds:.0f} s), {len(test)} test words, S = {args.num_samples} "
          f"(evaluation {eval_seconds:.0f} s), epsilon = {monteclora.monteclora_config.sample_scaler:g}")
    print(f"{'':<12}{'accuracy':>10}{'NLL':>9}{'ECE':>9}{'Brier':>9}")
    for name in ("mean", "predictive"):
        m = calibration_metrics(outputs[name]["probs"], labels)
        print(f"{name:<12}{m['accuracy']:>10.4f}{m['nll']:>9.4f}{m['ece']:>9.4f}{m['brier']:>9.4f}")
    print("Spearman rank correlation with the raters' std (and with -|mean rating|):")
    for name, key in (("mean", "entropy"), ("predictive", "entropy"), ("predictive", "mutual_information")):
        values = outputs[name][key]
        print(f"  {name + ' ' + key:<32} rho(std) = {rank_correlation(values, std):+.3f}   "
              f"rho(-|mean|) = {rank_correlation(values, neutral):+.3f}   (mean value {float(values.mean()):.3g})")
    print(format_summary(summary(monteclora)))
    if args.diagram:
        path = reliability_diagram(outputs["predictive"]["probs"], labels, args.diagram,
                                   title=f"MiniLM + MonteCLoRA, VADER held-out words (S = {args.num_samples})")
        print(f"reliability diagram: {path}")
    if args.timing:
        texts = list(test["text"][: args.batch_size])
        seconds = timing(monteclora, tokenizer, texts, args.num_samples, repeats=5)
        print(f"one predictive call, batch {len(texts)}, S = {args.num_samples} (median of 5): "
              f"vectorized {seconds['vectorized'] * 1e3:.0f} ms, loop {seconds['loop'] * 1e3:.0f} ms, "
              f"loop / vectorized = {seconds['loop'] / seconds['vectorized']:.2f}")


if __name__ == "__main__":
    main()
