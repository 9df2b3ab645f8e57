"""Fine-tune the packaged all-MiniLM-L6-v2 on the VADER sentiment lexicon, and see what the posterior buys.

Each of the 7.5k VADER words was rated by 10 people from -4 to +4; the label is the sign of the
mean rating. The run follows the package's recommended recipe (docs/uncertainty.md): train with
:func:`pyro_monteclora.train`, then choose the posterior's width on a validation split carved from
the training words (:func:`pyro_monteclora.tune_posterior_scale`; the test words are never used to
choose anything). It prints, side by side on the held-out test words:

- the mean adapter (what plain LoRA predicts), the mean adapter + temperature scaling (fitted on
  the same validation words) and the posterior predictive: accuracy, NLL, ECE;
- what the uncertainty is for: the accuracy on the words kept when the 10% / 20% least certain are
  deferred (to a person, say), and the AUROC of the uncertainty as a detector of the model's errors;

and writes the reliability diagram and the risk-coverage curve as PNGs (it says where); ``--save``
also saves the model (merged, the posterior beside it)::

    python examples/vader_sentiment.py [--train-size 2000] [--epochs 4] [--output-dir vader_results] [--save]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForSequenceClassification, set_seed

import pyro_monteclora
from pyro_monteclora.calibration import (
    calibration_metrics, fit_temperature, rank_correlation, reliability_diagram, temperature_scale,
)
from pyro_monteclora.examples import load_vader, minilm_path
from pyro_monteclora.prediction.predictive import predict
from pyro_monteclora.prediction.uncertainty import coverage_plot, detection_metrics, selective_prediction
from pyro_monteclora.quiet import quiet


def uses(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy after deferring the 10% / 20% least confident rows, and the AUROC of ``1 - max p`` for errors."""
    confidence = probs.max(-1).values
    correct = probs.argmax(-1) == labels
    out = {}
    for share in (0.1, 0.2):
        kept = confidence.argsort(descending=True, stable=True)[: round(len(labels) * (1 - share))]
        out[f"kept_{round(100 * (1 - share))}"] = float(correct[kept].double().mean())
    errors = ~correct
    out["error_auroc"] = detection_metrics(-confidence[~errors], -confidence[errors])["auroc"] if errors.any() else float("nan")
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=2000, help="training words (the validation words come on top)")
    parser.add_argument("--val-size", type=int, default=500, help="validation words, carved from the training split")
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="vader_results", help="where the PNGs go")
    parser.add_argument("--save", action="store_true", help="also save the model (merged, with its posterior) in "
                        "OUTPUT_DIR/model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    data = load_vader(seed=args.seed, test_size=args.test_size, train_size=args.train_size + args.val_size)
    train = data["train"].select(range(args.train_size))
    val = data["train"].select(range(args.train_size, args.train_size + args.val_size))
    test = data["test"]
    set_seed(args.seed)  # the new classification head is drawn from the global random state
    with quiet():  # transformers' load report: the classification head is new, as it should be
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    result = pyro_monteclora.train(model, train, num_epochs=args.epochs, batch_size=32, seed=args.seed,
                                   eval_every_epoch=False, progress=not args.no_progress)
    monteclora = result.model

    # the recipe: the posterior's width chosen on validation; for LoRA + TS one temperature, same words
    choice = pyro_monteclora.tune_posterior_scale(monteclora, val, num_samples=4, seed=args.seed)
    val_mean = predict(monteclora, val, mode="mean")["probs"]
    temperature = fit_temperature(val_mean, torch.tensor(val["label"]))

    labels = torch.tensor(test["label"])
    mean = predict(monteclora, test, mode="mean")["probs"]
    predictive = predict(monteclora, test, num_samples=args.num_samples, seed=args.seed)
    rows = {"mean adapter (LoRA)": mean,
            f"mean adapter + temperature {temperature:.2f}": temperature_scale(mean, temperature),
            f"posterior predictive (S = {args.num_samples})": predictive["probs"]}
    majority = max(float(labels.float().mean()), 1 - float(labels.float().mean()))
    print(f"\n{len(test)} held-out VADER words (majority class {majority:.3f}); the posterior's width: "
          f"{choice.factor:g} x the trained epsilon, chosen on {len(val)} validation words")
    print(f"{'':<34}{'accuracy':>9}{'NLL':>8}{'ECE':>7}{'  accuracy, 10% / 20% deferred':>32}{'error AUROC':>13}")
    figures = {}
    for name, probs in rows.items():
        m = {**calibration_metrics(probs, labels), **uses(probs, labels)}
        figures[name] = m
        print(f"{name:<34}{m['accuracy']:>9.3f}{m['nll']:>8.3f}{m['ece']:>7.3f}"
              f"{m['kept_90']:>21.3f} / {m['kept_80']:.3f}{m['error_auroc']:>15.3f}")
    std = torch.tensor(test["rating_std"])
    print(f"raters' disagreement (std of the 10 ratings) vs the predictive's mutual information: Spearman "
          f"{rank_correlation(predictive['mutual_information'], std):.3f}")

    os.makedirs(args.output_dir, exist_ok=True)
    diagram = reliability_diagram(predictive["probs"], labels, os.path.join(args.output_dir, "reliability.png"),
                                  title="Posterior predictive, held-out VADER words")
    curves = coverage_plot({name: selective_prediction(probs, labels) for name, probs in rows.items()},
                           os.path.join(args.output_dir, "risk_coverage.png"), title="Deferring the least certain words")
    print(f"wrote {diagram} and {curves}; {time.perf_counter() - start:.0f} s in all")
    if args.save:  # the chosen width is part of what is saved
        print(f"saved the model in {pyro_monteclora.save_result(result, os.path.join(args.output_dir, 'model'))}")
    return figures


if __name__ == "__main__":
    main()
