"""Does a larger noise scale epsilon (``sample_scaler``) make pyro_monteclora more robust / better calibrated?

A focused VADER study (MiniLM, ``load_vader(seed=0, test_size=500, train_size=3000)``, batch 32,
2 epochs, seed 0): pyro_monteclora at several ``sample_scaler`` values x learning rates, against
plain peft LoRA at the same learning rates, with the shared harness of ``common.py`` (same data,
order, initialization, optimizer, schedule, clipping and evaluation).

Per run: accuracy, NLL, ECE (15 bins) and Brier of the mean adapter and of the posterior
predictive (S draws), the mean mutual information of the predictive, and Spearman's rho
(``pyro_monteclora.calibration.rank_correlation``) of the predictive entropy with the raters'
standard deviation ``rating_std``.

Usage::

    python -m benchmarks.noise_scale                          # eps 5e-3, 2e-2, 5e-2 x lr 1e-3, 3e-3, 1e-2
    python -m benchmarks.noise_scale --eps 5e-3 2e-2 5e-2 1e-1
    python -m benchmarks.noise_scale --from-json benchmarks/results/noise_scale.json   # re-make the table

Writes ``noise_scale.md`` and ``noise_scale.json`` (raw per-run records) under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch

from . import common
from pyro_monteclora.calibration import rank_correlation


def _rho(scores: np.ndarray, truth: np.ndarray) -> float:
    try:
        return rank_correlation(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64))
    except ValueError:  # constant predictions (collapsed run)
        return float("nan")


def run(task, method: str, lr: float, eps: float | None, args) -> list[dict]:
    start = time.perf_counter()
    labels, std = task.eval_labels, task.rating_std
    base = dict(lr=lr, eps=eps, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed)
    if method == "lora":
        model = common.train_peft(task, False, lr, args.batch_size, args.epochs, args.seed)
        probs = common.predict_deterministic(task, lambda x: model(**x).logits)
        seconds = time.perf_counter() - start
        return [dict(base, method="lora", seconds=seconds, **common.calibration(probs, labels),
                     entropy_rho=_rho(common.entropy(probs), std))]
    mc = common.train_ours(task, lr, args.batch_size, args.epochs, args.seed, sample_scaler=eps)
    mean = common.predict_deterministic(task, lambda x: mc.network(**x).logits)
    pp, draws = common.predict_posterior(task, mc, num_draws=args.draws, seed=args.seed)
    seconds = time.perf_counter() - start
    mi = common.entropy(pp) - common.entropy(draws).mean(0)
    return [
        dict(base, method="ours_mean", seconds=seconds, **common.calibration(mean, labels),
             entropy_rho=_rho(common.entropy(mean), std)),
        dict(base, method="ours_pp", seconds=seconds, **common.calibration(pp, labels),
             entropy_rho=_rho(common.entropy(pp), std), mutual_information=float(mi.mean()),
             mi_rho=_rho(mi, std),
             # how far the predictive moves from the mean adapter: mean |p_pp - p_mean| of class 1
             pp_vs_mean=float(np.abs(pp[:, 1] - mean[:, 1]).mean())),
    ]


def table(records: list[dict], majority: float) -> list[str]:
    lines = [
        "| method | ε | lr | acc | NLL | ECE | Brier | mean MI | ρ(entropy, rating std) | ρ(MI, rating std) | mean \\|p_pp − p_mean\\| | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"lora": 0, "ours_mean": 1, "ours_pp": 2}
    for r in sorted(records, key=lambda r: (order[r["method"]], r["eps"] or 0, r["lr"])):
        mi = f"{r['mutual_information']:.2e}" if "mutual_information" in r else "–"
        mi_rho = f"{r['mi_rho']:.3f}" if "mi_rho" in r else "–"
        shift = f"{r['pp_vs_mean']:.4f}" if "pp_vs_mean" in r else "–"
        lines.append(
            f"| {r['method']} | {r['eps'] if r['eps'] is not None else '–'} | {r['lr']:g} | {100 * r['accuracy']:.1f} "
            f"| {r['nll']:.3f} | {r['ece']:.3f} | {r['brier']:.3f} | {mi} | {r['entropy_rho']:.3f} | {mi_rho} "
            f"| {shift} | {r['seconds']:.0f} |"
        )
    lines += ["", f"Majority baseline: {100 * majority:.1f}%.", "",
              "Across learning rates (per method and ε): best / worst accuracy, spread, mean NLL / ECE / Brier "
              "over the lrs.", "",
              "| method | ε | best acc | worst acc | spread | mean NLL | mean ECE | mean Brier |",
              "|---|---|---|---|---|---|---|---|"]
    groups = sorted({(r["method"], r["eps"]) for r in records}, key=lambda g: (order[g[0]], g[1] or 0))
    for method, eps in groups:
        rows = [r for r in records if r["method"] == method and r["eps"] == eps]
        acc = np.array([r["accuracy"] for r in rows])
        lines.append(
            f"| {method} | {eps if eps is not None else '–'} | {100 * acc.max():.1f} | {100 * acc.min():.1f} "
            f"| {100 * (acc.max() - acc.min()):.1f} | {np.mean([r['nll'] for r in rows]):.3f} "
            f"| {np.mean([r['ece'] for r in rows]):.3f} | {np.mean([r['brier'] for r in rows]):.3f} |"
        )
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, nargs="+", default=[5e-3, 2e-2, 5e-2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-3, 1e-3])
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--from-json", default=None, help="re-make the table from saved raw records")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "noise_scale.json")
    start = time.perf_counter()
    task = common.load_task("vader", args.train_size, args.test_size, seed=0)
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as handle:
            records = json.load(handle)
    else:
        records = []
        print(f"vader: {len(task.train)} train, {len(task.eval_labels)} test, majority {100 * task.majority:.1f}%",
              flush=True)
        for lr in args.lrs:
            for method, eps in [("lora", None)] + [("ours", e) for e in args.eps]:
                new = run(task, method, lr, eps, args)
                records += new
                for r in new:
                    print(f"  lr={lr:g} eps={eps} {r['method']:9s} acc={r['accuracy']:.3f} nll={r['nll']:.3f} "
                          f"ece={r['ece']:.3f} brier={r['brier']:.3f} rho={r['entropy_rho']:.3f} "
                          f"mi={r.get('mutual_information', float('nan')):.2e} ({r['seconds']:.0f}s)", flush=True)
                with open(path, "w", encoding="utf-8") as handle:
                    json.dump(records, handle, indent=1)
    minutes = (time.perf_counter() - start) / 60
    command = "python -m benchmarks.noise_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# Noise scale ε (sample_scaler) on VADER",
        "",
        f"Command: `{command.strip()}`; date: {datetime.date.today()}; {minutes:.1f} min on {args.threads} CPU "
        "thread(s) of a machine shared with other jobs.",
        f"MiniLM, LoRA r=16, alpha=32, dropout 0.05, all-linear; AdamW, linear schedule, 3% warm-up, clip 1.0; "
        f"VADER train {args.train_size} / test {args.test_size} (`load_vader(seed=0)`), batch {args.batch_size}, "
        f"{args.epochs} epochs, seed {args.seed}. ours_mean = mean adapter, ours_pp = posterior predictive of "
        f"{args.draws} draws; MI = mutual information of the predictive; ρ = Spearman "
        "(`pyro_monteclora.calibration.rank_correlation`) with the raters' standard deviation; s = seconds for "
        "training + evaluation of the run.",
        "",
        *table(records, task.majority),
        "",
    ])
    with open(os.path.join(args.out, "noise_scale.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
