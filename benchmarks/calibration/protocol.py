"""Calibration, shift and OOD detection where LoRA overfits: pyro_monteclora against what people use instead.

Run from the repository root::

    python -m benchmarks.calibration --suites vader obqa --seeds 0 1 2     # runs the missing jobs, then summarizes
    python -m benchmarks.calibration --summarize                           # tables and plots from the saved jobs

Suites (:mod:`.methods`): ``vader`` (MiniLM on VADER words), ``obqa`` (SmolLM2-135M-Instruct
fine-tuned on OpenBookQA in instruction format, scored by multiple choice; shift: ARC-Easy; OOD:
BoolQ questions and the math sets, scored over OpenBookQA's answers), ``arc`` and ``boolq``
(SmolLM2 on ARC-Easy / BoolQ), ``obqa_gpu`` (``obqa`` on a GPU with its own seeds: see
benchmarks/README.md). Small training subsets and several epochs, so that plain LoRA overfits:
its test NLL rises while its training NLL falls (``curve`` in the results).

Methods: ``lora``; ``lora_ts`` (temperature fitted on the validation split); ``mc_dropout``
(LoRA dropout kept at test, S draws); ``ensemble`` (3 LoRAs: 3x the training cost);
``peft_mc`` (peft's MonteCLoRA variant); ``ours`` (paper settings, S draws); ``ours_improved``
(the same adapter, noise scale chosen on the validation split: the lever that won, see the
README); ``bayesianize`` (the trained LoRA's posterior fitted on the validation split, then
its scale chosen there too); ``ours_wide`` (trained with epsilon = 0.05, 10x the paper's: the
best lever of ``calibration/levers.py`` on VADER, added after that study); ``ours_column`` (the prior on
A~'s columns with an empirical-Bayes scale, KL weight 0.1: the best column-prior weight of that
study on VADER, added after it). S = 10, 15-bin ECE. Every finished job is saved
(:mod:`calibration_jobs`); results go to ``benchmarks/results/calibration.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import numpy as np
import torch

from .jobs import JOBS, job_path, run_job
from .methods import SUITES
from pyro_monteclora.calibration import calibration_metrics
from pyro_monteclora.prediction.uncertainty import detection_metrics, selective_prediction

METHODS = ("lora", "lora_ts", "mc_dropout", "ensemble", "peft_mc", "ours", "ours_improved", "bayesianize", "ours_wide",
           "ours_column")
OUT = os.path.join("benchmarks", "results")


def _load(suite, job, seed):
    path = job_path(SUITES[suite], job, seed)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _entropy(p):
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(-1)


def _temperature(log_probs, labels):
    """The temperature minimizing the NLL of ``softmax(log_probs / T)`` (grid on log T, then refined)."""
    lp = torch.tensor(log_probs)
    y = torch.tensor(labels)

    def nll(t):
        return float(torch.nn.functional.cross_entropy(lp / t, y))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 121))
    best = min(grid, key=nll)
    fine = np.exp(np.linspace(np.log(best) - 0.06, np.log(best) + 0.06, 61))
    return float(min(fine, key=nll))


def method_outputs(suite, method, seed):
    """``{set: (probs, mutual_information, labels)}`` of one method and seed, or ``None`` if not run yet."""
    def unpack(record, key="outputs"):
        out = record[key]
        return {s: (np.asarray(out["probs"][s]), np.asarray(out["mutual_information"][s]), np.asarray(out["labels"][s]))
                for s in out["probs"] if s != "val"}

    if method in ("lora", "mc_dropout", "peft_mc", "ours", "ours_improved", "bayesianize", "ours_wide", "ours_column"):
        record = _load(suite, method, seed)
        return None if record is None else unpack(record)
    if method in ("ours_mean", "ours_column_mean"):
        record = _load(suite, method[: -len("_mean")], seed)
        return None if record is None else unpack(record, "mean_adapter")
    if method == "lora_ts":
        record = _load(suite, "lora", seed)
        if record is None:
            return None
        out = record["outputs"]
        t = _temperature(out["mean_log_probs"]["val"], out["labels"]["val"])
        result = {}
        for s, lp in out["mean_log_probs"].items():
            if s == "val":
                continue
            p = torch.softmax(torch.tensor(lp) / t, -1).numpy()
            result[s] = (p, np.zeros(len(p)), np.asarray(out["labels"][s]))
        return result
    if method == "ensemble":
        members = [_load(suite, j, seed) for j in ("lora", "lora_m1", "lora_m2")]
        if any(m is None for m in members):
            return None
        result = {}
        for s in members[0]["outputs"]["probs"]:
            if s == "val":
                continue
            ps = np.stack([np.asarray(m["outputs"]["probs"][s]) for m in members])
            mean = ps.mean(0)
            result[s] = (mean, np.clip(_entropy(mean) - _entropy(ps).mean(0), 0, None), np.asarray(members[0]["outputs"]["labels"][s]))
        return result
    raise ValueError(method)


def metrics_of(outputs):
    """ID metrics per labelled set; OOD detection (in = test) per ``ood_*`` set."""
    result = {}
    for s, (p, mi, y) in outputs.items():
        if s.startswith("ood_"):
            continue
        m = calibration_metrics(torch.tensor(p), torch.tensor(y))
        m["aurc"] = selective_prediction(torch.tensor(p), torch.tensor(y))["aurc"]
        m["confidence"] = float(p.max(-1).mean())  # how far from uniform (1 / classes) it predicts
        m["classes"] = int(p.shape[-1])
        result[s] = m
    p_in, mi_in, _ = outputs["test"]
    for s, (p, mi, _) in outputs.items():
        if not s.startswith("ood_"):
            continue
        result[s] = {
            "max_probability": detection_metrics(-torch.tensor(p_in.max(-1)), -torch.tensor(p.max(-1)))["auroc"],
            "entropy": detection_metrics(torch.tensor(_entropy(p_in)), torch.tensor(_entropy(p)))["auroc"],
            "mutual_information": detection_metrics(torch.tensor(mi_in), torch.tensor(mi))["auroc"],
        }
    return result


def summarize(suites, seeds):
    """Per suite and method: the metrics of each finished seed, their mean and std, and paired differences vs LoRA."""
    summary = {}
    for suite in suites:
        per = {}
        for method in METHODS + ("ours_mean", "ours_column_mean"):
            runs = {}
            for seed in seeds:
                outputs = method_outputs(suite, method, seed)
                if outputs is not None:
                    runs[seed] = metrics_of(outputs)
            per[method] = runs
        summary[suite] = per
    return summary


def _stat(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def _paired(per, method, key, metric):
    seeds = sorted(set(per[method]) & set(per["lora"]))
    diff = [per[method][s][key][metric] - per["lora"][s][key][metric] for s in seeds]
    if not diff:
        return float("nan"), float("nan"), 0
    mean, std = _stat(diff)
    return mean, std / np.sqrt(len(diff)) if len(diff) > 1 else float("nan"), len(diff)


def table(summary, suite):
    per = summary[suite]
    lines = []
    sets = [s for s in ("test", "shift") if any(s in r for runs in per.values() for r in runs.values())]
    for key in sets:
        lines += [f"\n**{suite}, {'in distribution (test)' if key == 'test' else 'under shift'}**: mean ± std over seeds; "
                  "Δ vs LoRA: paired mean ± SE\n",
                  "| method | seeds | accuracy | NLL | ECE | Brier | AURC | confidence | Δ acc | Δ NLL | Δ ECE |",
                  "|" + "---|" * 11]
        classes = {r[key].get("classes") for runs in per.values() for r in runs.values() if key in r} - {None}
        for method, runs in per.items():
            if not runs or key not in next(iter(runs.values())):
                continue
            cells = []
            for metric in ("accuracy", "nll", "ece", "brier", "aurc", "confidence"):
                mean, std = _stat([r[key][metric] for r in runs.values()])
                cells.append(f"{mean:.3f} ± {std:.3f}")
            deltas = []
            for metric in ("accuracy", "nll", "ece"):
                mean, se, n = _paired(per, method, key, metric)
                deltas.append("—" if method == "lora" or not n else f"{mean:+.3f} ± {se:.3f}")
            lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells + deltas) + " |")
        for c in sorted(classes):  # the reference any calibration gain on a task near chance should be read against
            lines.append(f"\nConfidence is the mean top probability. Uniform over the {c} answers: NLL ln {c} = "
                         f"{np.log(c):.3f}, confidence {1 / c:.3f}.")
    oods = sorted({s for runs in per.values() for r in runs.values() for s in r if s.startswith("ood_")})
    for key in oods:
        lines += [f"\n**{suite}, OOD detection: test vs {key[4:]}** (AUROC, mean ± std)\n",
                  "| method | seeds | max probability | entropy | mutual information |", "|---|---|---|---|---|"]
        for method, runs in per.items():
            if runs and key in next(iter(runs.values())):
                cells = [("{:.3f} ± {:.3f}".format(*_stat([r[key][s] for r in runs.values()])))
                         for s in ("max_probability", "entropy", "mutual_information")]
                lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", nargs="+", default=["vader", "obqa"], choices=sorted(SUITES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--summarize", action="store_true", help="only summarize the saved jobs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.summarize:
        for seed in args.seeds:  # seed-major: every method of seed 0 first, so a cut run has whole seeds
            for suite in args.suites:
                for job in args.jobs:
                    if not os.path.exists(job_path(SUITES[suite], job, seed)):
                        print(f"[{datetime.datetime.now():%H:%M:%S}] {suite} {job} seed {seed}", flush=True)
                        run_job(SUITES[suite], job, seed)
    from .report import write_report

    summary = summarize(args.suites, args.seeds)
    command = "python -m benchmarks.calibration " + " ".join(argv if argv is not None else sys.argv[1:])
    tables = {suite: table(summary, suite) for suite in args.suites}
    print(write_report(summary, args.suites, args.seeds, command.strip(), tables, method_outputs, _load))
    return summary


if __name__ == "__main__":
    main()
