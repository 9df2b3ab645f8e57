"""The levers for a posterior that matters, measured one at a time on the VADER suite (MiniLM, 3 seeds).

Each lever keeps the model's structure (Wishart covariance, Dirichlet weights, N Gaussian
components per column, E[A~] = A) and changes one thing:

- ``paper``: the paper's settings (epsilon 5e-3, KL weight 1), S = 10;
- ``scale_tuned``: the paper's adapter, epsilon multiplied after training by the factor with the
  lowest validation NLL (:func:`pyro_monteclora.tune_posterior_scale`);
- ``scale_tolerance``: the same, TFB's rule: the widest scale whose validation NLL is at most
  0.01 nats above the mean adapter's;
- ``train_eps_<e>``: trained with epsilon = e (the noise acts during training too);
- ``kl_weight_<w>``: the KL term weighted by w (a tempered ELBO);
- ``scale_tuned_S30``: ``scale_tuned`` with 30 draws at test instead of 10;
- ``column_prior_kl_<w>``: the prior ``N(0, s^2 I)`` on A~'s columns with an empirical-Bayes scale
  (``column_prior=True``, :mod:`pyro_monteclora.models.column_prior`), so that the ELBO rewards
  width, with the KL weighted by w (its KL sums over every column of every layer).

Usage: ``python -m benchmarks.calibration.levers [--seeds 0 1 2]``; every finished run is saved
in ``benchmarks/results/calibration_levers/``, the table goes to ``calibration_levers.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

import numpy as np
import torch

from .protocol import metrics_of
from .jobs import score_posterior
from .methods import SUITES, Outputs, load_suite_data, timed, tokenizer_of, train_ours

RESULTS = os.path.join("benchmarks", "results", "calibration_levers")
LEVERS = {
    "paper": ({}, None, 10),
    "scale_tuned": ({}, "nll", 10),
    "scale_tolerance": ({}, "tolerance", 10),
    "scale_tuned_S30": ({}, "nll", 30),
    "train_eps_0.02": ({"sample_scaler": 0.02}, None, 10),
    "train_eps_0.05": ({"sample_scaler": 0.05}, None, 10),
    "kl_weight_0": ({"kl_weight": 0.0}, None, 10),
    "kl_weight_100": ({"kl_weight": 100.0}, None, 10),
    "column_prior_kl_1": ({"column_prior": True}, None, 10),
    "column_prior_kl_0.1": ({"column_prior": True, "kl_weight": 0.1}, None, 10),
    "column_prior_kl_0.01": ({"column_prior": True, "kl_weight": 0.01}, None, 10),
    "column_prior_kl_0.001": ({"column_prior": True, "kl_weight": 0.001}, None, 10),
}


def run(lever: str, seed: int, cache: dict) -> dict:
    path = os.path.join(RESULTS, f"{lever}-s{seed}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    from pyro_monteclora.prediction.posterior_scale import tune_posterior_scale

    suite = SUITES["vader"]
    data, tokenizer = load_suite_data(suite), tokenizer_of(suite)
    overrides, rule, samples = LEVERS[lever]
    key = (json.dumps(overrides, sort_keys=True), seed)
    if key not in cache:  # the levers that only act after training share one trained adapter
        cache[key] = timed(lambda: train_ours(suite, data["train"], seed, [], **overrides))
    result, seconds = cache[key]
    monteclora = result.model
    record = {"lever": lever, "seed": seed, "train_seconds": seconds, "kl_per_example": result.history[-1]["kl"],
              "mean_log_scale": float(torch.cat([p.log_scale_diag.detach().reshape(-1)
                                                 for p in monteclora.guide.posteriors.values()]).mean())}
    trained_scale = monteclora.monteclora_config.sample_scaler
    if rule is not None:
        choice = tune_posterior_scale(monteclora, data["val"], num_samples=4, seed=seed, tokenizer=tokenizer, rule=rule)
        record["factor"] = choice.factor
    outputs = Outputs()
    score_posterior(dataclasses.replace(suite, samples=samples), monteclora, tokenizer, data, outputs, False, seed)
    from pyro_monteclora.prediction.posterior_scale import set_sample_scaler

    set_sample_scaler(monteclora, trained_scale)  # the shared adapter goes back to its trained scale
    unpacked = {k: (np.asarray(outputs.probs[k]), np.asarray(outputs.mutual_information[k]), np.asarray(outputs.labels[k]))
                for k in outputs.probs}
    record["test"] = metrics_of(unpacked)["test"]
    record["mean_mutual_information"] = float(np.mean(outputs.mutual_information["test"]))
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS),
                        help="run only these (the table lists every lever with saved runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache: dict = {}
    rows = []
    for lever in LEVERS:
        saved = [s for s in args.seeds if os.path.exists(os.path.join(RESULTS, f"{lever}-s{s}.json"))]
        if lever not in args.levers and not saved:
            continue
        records = [run(lever, seed, cache) for seed in (args.seeds if lever in args.levers else saved)]
        cells = []
        for metric in ("accuracy", "nll", "ece"):
            values = [r["test"][metric] for r in records]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else float('nan'):.3f}")
        factors = [r.get("factor") for r in records]
        extra = f"{np.mean([r['mean_mutual_information'] for r in records]):.4f}"
        kl = f"{np.mean([r['kl_per_example'] for r in records]):.1e}"
        scales = [r["mean_log_scale"] for r in records if "mean_log_scale" in r]
        kl += f" | {np.mean(scales):+.2f}" if len(scales) == len(records) else " | —"
        rows.append(f"| {lever} | {len(records)} | " + " | ".join(cells) + f" | {extra} | {kl} | "
                    + (", ".join(f"{f:.2f}" for f in factors) if factors[0] is not None else "—") + " |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Levers for the posterior, one at a time (VADER suite: MiniLM, 256 words x 20 epochs)",
        "",
        f"Command: `python -m benchmarks.calibration.levers {' '.join(argv or sys.argv[1:])}`; date: {datetime.date.today()}. "
        "Test: 1000 words; validation (for the scale): 256 words; mean ± std over seeds. "
        "Guide's mean log scale: the mean of log v, the Wishart scale of the guide's covariance (0 at the prior; "
        "recorded from the column-prior runs on).",
        "",
        "| lever | seeds | accuracy | NLL | ECE | mean MI (nats) | KL per example (nats) | guide's mean log scale | chosen factor per seed |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    with open(os.path.join("benchmarks", "results", "calibration_levers.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
