"""Fine-tune the packaged all-MiniLM-L6-v2 on the VADER sentiment lexicon with MonteCLoRA.

Each of the 7.5k VADER words was rated by 10 people from -4 to +4; the label is the sign of the
mean rating. Prints held-out accuracy, NLL, Brier score and ECE of the mean adapter and of the
posterior predictive, and how well predictive uncertainty tracks the raters' disagreement.

    python examples/vader_sentiment.py [--train-size 6000] [--epochs 3]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForSequenceClassification

import pyro_monteclora
from pyro_monteclora.calibration import rank_correlation
from pyro_monteclora.prediction.evaluation import evaluate
from pyro_monteclora.examples import load_vader, minilm_path
from pyro_monteclora.prediction.predictive import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_vader(seed=args.seed, test_size=args.test_size, train_size=args.train_size)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    result = pyro_monteclora.train(model, data, num_epochs=args.epochs, batch_size=32, seed=args.seed)

    test = data["test"]
    labels = torch.tensor(test["label"])
    majority = max(float(labels.float().mean()), 1 - float(labels.float().mean()))
    metrics = evaluate(result.model, test, num_samples=args.num_samples, seed=args.seed)
    print(f"\nheld-out VADER words: {len(test)} (majority-class accuracy {majority:.3f})")
    print(f"{'':<22}{'accuracy':>10}{'NLL':>10}{'Brier':>10}{'ECE(15)':>10}")
    for name in ("mean", "predictive"):
        m = metrics[name]
        print(f"{name + ' adapter' if name == 'mean' else 'posterior predictive':<22}"
              f"{m['accuracy']:>10.4f}{m['nll']:>10.4f}{m['brier']:>10.4f}{m['ece']:>10.4f}")
    outputs = predict(result.model, test, num_samples=args.num_samples, seed=args.seed)
    std = torch.tensor(test["rating_std"])
    print(f"Spearman(predictive entropy, raters' std)  = {rank_correlation(outputs['entropy'], std):.3f}")
    print(f"Spearman(mutual information, raters' std)  = {rank_correlation(outputs['mutual_information'], std):.3f}")


if __name__ == "__main__":
    main()
