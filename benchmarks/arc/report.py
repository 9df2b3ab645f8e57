"""The report of ``benchmarks.arc``: ``benchmarks/results/arc.md`` (+ ``.json``, ``.png``) from the saved jobs.

Per method and set: accuracy, accuracy_norm (lm-eval's), NLL, Brier, ECE (15 bins), AURC and the
mean top probability, as the mean over seeds with a 95% t-interval (none for one seed); the targets
of issues #25 and #31 as paired differences over the seeds two rows share, each with its 95%
t-interval and stated hit or missed (on the mean, or with the whole interval); the recommended row
of ours chosen on validation NLL; the validation curves of the posterior scale; the learning-rate
study's spreads; a figure of reliability diagrams (test) and of NLL / ECE against the training step.
"""

from __future__ import annotations

import datetime
import functools
import glob
import json
import math
import os
from typing import Optional

import numpy as np
import torch

from pyro_monteclora.calibration import calibration_bins, fit_temperature, temperature_scale
from pyro_monteclora.prediction.uncertainty import selective_prediction

from .data import LEARNING_RATES, PROTOCOL
from .jobs import RESULTS, job_path
from .methods import metrics

OUT = os.path.join("benchmarks", "results")
#: Report rows: name -> (description, how to get its outputs).
METHODS = {
    "lora": "peft LoRA (MLE, SFT)",
    "lora_ts": "LoRA + temperature scaling (T fitted on val)",
    "lora_mc": "peft LoRA (MLE) by the multiple-choice likelihood",
    "lora_mc_ts": "LoRA by the multiple-choice likelihood + temperature scaling",
    "mc_dropout": f"LoRA MC dropout (S = {PROTOCOL.samples})",
    "mc_dropout_ts": "LoRA MC dropout + temperature scaling",
    "ensemble": "3-LoRA deep ensemble",
    "blob": f"BLoB-style Gaussian on A (flipout, S = {PROTOCOL.samples})",
    "blob_ts": "BLoB-style predictive + temperature scaling",
    "peft_mc": "peft's MonteCLoRA variant",
    "ours_mean": "ours (paper settings), mean adapter",
    "ours": f"ours (paper settings), predictive S = {PROTOCOL.samples}",
    "ours_ts": "ours predictive + temperature scaling",
    "ours_recommended": "ours by the multiple-choice likelihood, posterior scale chosen on val",
    "ours_learned_mean": "ours, learned width (#31), mean adapter",
    "ours_learned": f"ours, learned width (#31), predictive S = {PROTOCOL.samples}",
    "ours_learned_ts": "ours learned-width predictive + temperature scaling",
    "ours_learned_recommended": "ours, learned width, every width scaled by the factor chosen on val",
    "ours_mc_mean": "ours by the multiple-choice likelihood, mean adapter",
    "ours_mc": f"ours by the multiple-choice likelihood, predictive S = {PROTOCOL.samples}",
    "ours_mc_ts": "ours multiple-choice predictive + temperature scaling",
    "bayesianize": "bayesianize(LoRA), fitted and scaled on val",
}
SETS = {"test": "ARC-Easy test", "shift": "OpenBookQA (shift)", "far": "BoolQ (far shift)"}
#: The 0.975 quantile of Student's t by degrees of freedom (1..30; beyond, the normal's 1.96 is within 4%).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.16, 14: 2.145, 15: 2.131, 16: 2.12, 17: 2.11, 18: 2.101, 19: 2.093, 20: 2.086,
         21: 2.08, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.06, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


@functools.lru_cache(maxsize=None)
def _load(job: str, seed: int, lr: float = PROTOCOL.lr) -> Optional[dict]:
    path = job_path(job, seed, lr)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _seeds(lr: float = PROTOCOL.lr) -> list[int]:
    suffix = "" if lr == PROTOCOL.lr else f"-lr{lr:g}"
    found = set()
    for path in glob.glob(os.path.join(RESULTS, f"*-s*{suffix}.json")):
        name = os.path.basename(path)[: -len(".json")]
        if (suffix and name.endswith(suffix)) or (not suffix and "-lr" not in name):
            found.add(int(name.split("-s")[1].split("-")[0]))
    return sorted(found)


def probs_of(out: dict) -> torch.Tensor:
    """A set's predictive probabilities (float64) from the saved log-probabilities (``-inf``: absent choice)."""
    return torch.tensor(out["log_probs"], dtype=torch.float64).exp()


def _scaled(outputs: dict, temperature: float) -> dict:
    return {name: {**out, "log_probs": temperature_scale(probs_of(out), temperature).log().tolist()}
            for name, out in outputs.items()}


@functools.lru_cache(maxsize=None)  # a report asks for the same rows many times (a _ts row fits its temperature)
def method_outputs(method: str, seed: int, lr: float = PROTOCOL.lr) -> Optional[dict]:
    """``{set: {probs, labels, prediction_norm?, mutual_information?}}`` of a method and seed, or None."""
    if method.endswith("_ts"):
        record = _load(method[: -len("_ts")], seed, lr)
        if record is None:
            return None
        val = record["outputs"]["val"]
        temperature = fit_temperature(probs_of(val), torch.tensor(val["labels"]))
        return {**_scaled(record["outputs"], temperature), "temperature": temperature}
    if method == "ensemble":
        members = [_load(job, seed, lr) for job in ("lora", "lora_m1", "lora_m2")]
        if any(m is None for m in members):
            return None
        return {name: {"log_probs": torch.stack([probs_of(m["outputs"][name]) for m in members]).mean(0).log().tolist(),
                       "labels": members[0]["outputs"][name]["labels"]} for name in members[0]["outputs"]}
    if method.endswith("_mean"):
        record = _load(method[: -len("_mean")], seed, lr)
        return None if record is None else record["mean_adapter"]
    record = _load(method, seed, lr)
    return None if record is None else record["outputs"]


def set_metrics(out: dict) -> dict[str, float]:
    probs, labels = probs_of(out), torch.tensor(out["labels"])
    result = metrics(probs, labels)
    result["aurc"] = float(selective_prediction(probs, labels)["aurc"])
    result["confidence"] = float(probs.max(-1).values.mean())
    if "prediction_norm" in out:
        result["accuracy_norm"] = float((torch.tensor(out["prediction_norm"]) == labels).double().mean())
    return result


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds (NaN for one seed)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan")
    return mean, T_975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def _cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean, half = interval(values)
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def summary(lr: float = PROTOCOL.lr) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{method: {set: {metric: [per seed]}}}`` over the seeds found."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in METHODS:
        for seed in _seeds(lr):
            outputs = method_outputs(method, seed, lr)
            if outputs is None:
                continue
            for name in SETS:
                for key, value in set_metrics(outputs[name]).items():
                    table.setdefault(method, {}).setdefault(name, {}).setdefault(key, []).append(value)
    return table


#: The rows of ours a user could be given (the recipe is the one of them with the lowest validation NLL).
OURS_ROWS = ("ours", "ours_ts", "ours_mc", "ours_mc_ts", "ours_learned", "ours_learned_ts", "ours_recommended",
             "ours_learned_recommended")


def verdict(mean: float, half: float) -> str:
    """``mean <= 0`` stated with its interval: a clear hit or miss, or a hit / miss on the mean only."""
    mean, half = round(mean, 12), round(half, 12)  # a difference of equal accuracies is 0, not 1e-17
    if math.isnan(half):
        return "hit on one seed" if mean <= 0 else "missed on one seed"
    if mean + half <= 0:
        return "hit (the interval too)"
    if mean - half > 0:
        return "missed (the interval too)"
    return "hit on the mean, the interval spans it" if mean <= 0 else "missed on the mean, the interval spans it"


def recommended_row(table: dict, rows: tuple[str, ...] = OURS_ROWS) -> Optional[str]:
    """The row of ours with the lowest validation NLL: the recipe, chosen on val only.

    Among the rows run on the most seeds (a recipe is measured over its seeds), compared on the seeds they share.
    A temperature-scaled row fits its temperature on the same val rows (T = 1 is in the grid), so on val it is
    never worse than its unscaled row: the choice is between post-hoc steps fitted there, as a user would fit them.
    """
    seeds = {m: {s for s in _seeds() if method_outputs(m, s) is not None} for m in rows if m in table}
    if not seeds:
        return None
    most = max(len(v) for v in seeds.values())
    run = [m for m, v in seeds.items() if len(v) == most]
    shared = sorted(set.intersection(*(seeds[m] for m in run)))
    return min(run, key=lambda m: float(np.mean([set_metrics(method_outputs(m, s)["val"])["nll"] for s in shared])))


def _diff(a: str, b: str, name: str, key: str, factor: float = 1.0, offset: float = 0.0) -> str:
    """``key(a) - factor * key(b) - offset`` per seed (paired), with its verdict against 0."""
    diffs = []
    for seed in _seeds():
        out_a, out_b = method_outputs(a, seed), method_outputs(b, seed)
        if out_a is not None and out_b is not None:
            diffs.append(set_metrics(out_a[name])[key] - factor * set_metrics(out_b[name])[key] - offset)
    if not diffs:
        return f"{a} and {b} share no seed"
    mean, half = interval(diffs)
    spread = "" if math.isnan(half) else f" ± {half:.3f}"
    return f"{mean:+.3f}{spread} over {len(diffs)} seed(s): {verdict(mean, half)}"


def _targets(table: dict) -> list[str]:
    """Issue #25's targets for the recommended row of ours, each a paired difference over the shared seeds with
    its 95% interval, against LoRA trained by SFT and against LoRA trained by the same multiple-choice likelihood."""
    ours = recommended_row(table)
    if ours is None:
        return ["- no row of ours has run yet."]
    lines = [f"The recommended row, the row of ours with the lowest validation NLL: **{ours}**. Each line is "
             "the paired difference over the seeds both rows ran (mean ± 95% t-interval); the target holds when it "
             "is <= 0.", ""]
    for lora in ("lora", "lora_mc"):
        if lora not in table:
            continue
        for name in ("test", "shift"):
            lines.append(
                f"- {SETS[name]}, against {lora}: ECE − {lora}_ts {_diff(ours, lora + '_ts', name, 'ece')}; "
                f"ECE − 0.4 × {lora} {_diff(ours, lora, name, 'ece', factor=0.4)}"
                + (f"; {lora} − 1 point − accuracy {_diff(lora, ours, name, 'accuracy', offset=0.01)}"
                   if name == "test" else ""))
    baselines = [m for m in table if m in METHODS and not m.startswith("ours")]
    for name in ("test", "shift"):
        lines.append(f"- {SETS[name]}, NLL below every other method: NLL − each baseline's, " + "; ".join(
            f"{m} {_diff(ours, m, name, 'nll')}" for m in baselines))
    return lines


#: The learned-width rows (#31): the predictive, its mean adapter, its temperature-scaled predictive.
LEARNED_JOBS = ("ours_learned",)


def _matched_lora(method: str) -> str:
    """The LoRA trained by the same likelihood as a row of ours (``lora_mc`` for the multiple-choice rows)."""
    return "lora_mc" if method.startswith(("ours_mc", "ours_recommended")) else "lora"


def learned_targets(table: dict) -> list[str]:
    """Issue #31's targets for the learned-width variant: paired differences over shared seeds, 95% intervals."""
    lines = []
    for job in LEARNED_JOBS:
        if job not in table:
            lines.append(f"- {job} has not run yet.")
            continue
        lora = _matched_lora(job)
        for name in ("val", "test"):
            lines.append(f"- {job}, {name}: predictive NLL − its mean adapter's {_diff(job, job + '_mean', name, 'nll')}")
        for name in ("test", "shift"):
            lines.append(f"- {job}, {SETS[name]}: without TS, ECE − 0.5 × {lora}'s "
                         f"{_diff(job, lora, name, 'ece', factor=0.5)}; {lora} − 1 point − accuracy "
                         f"{_diff(lora, job, name, 'accuracy', offset=0.01)}")
    best = recommended_row(table, tuple(m for m in OURS_ROWS if m.endswith("_ts")))
    if best is not None:
        lora = _matched_lora(best) + "_ts"
        for name in ("test", "shift"):
            lines.append(f"- the best variant + TS (chosen on val NLL: {best}), {SETS[name]}, against {lora}: NLL "
                         f"{_diff(best, lora, name, 'nll')}; ECE {_diff(best, lora, name, 'ece')}")
    return lines


def likelihood_choice(table: dict) -> list[str]:
    """SFT against the multiple-choice likelihood, for ours and for LoRA: decided on validation, reported on test."""
    seeds = [s for s in _seeds() if method_outputs("ours", s) is not None and method_outputs("ours_mc", s) is not None]
    if not seeds:
        return ["- ours and ours_mc have not both run on a seed yet."]
    lines = ["| method | likelihood | set | seeds | accuracy | NLL | ECE | AURC |", "|---|---|---|---|---|---|---|---|"]
    chosen = {}
    for method, who, label in (("lora", "LoRA", "SFT"), ("lora_mc", "LoRA", "multiple choice"),
                               ("ours", "ours (S = 8)", "SFT"), ("ours_mc", "ours (S = 8)", "multiple choice")):
        runs = [s for s in seeds if method_outputs(method, s) is not None]
        for name in ("val", "test"):
            values = [set_metrics(method_outputs(method, s)[name]) for s in runs]
            if not values:
                continue
            lines.append(f"| {who} | {label} | {name} | {len(runs)} | {_cell([v['accuracy'] for v in values])} | "
                         f"{_cell([v['nll'] for v in values])} | {_cell([v['ece'] for v in values])} | "
                         f"{_cell([v['aurc'] for v in values])} |")
            if name == "val" and method.startswith("ours"):
                chosen[method] = (float(np.mean([v["nll"] for v in values])),
                                  float(np.mean([v["accuracy"] for v in values])))
    (nll_sft, acc_sft), (nll_mc, acc_mc) = chosen["ours"], chosen["ours_mc"]
    better = "ours_mc" if nll_mc < nll_sft and acc_mc >= acc_sft - 0.01 else "ours"
    lines += ["", f"On validation (the only set that chooses), ours: NLL {nll_sft:.3f} (SFT) vs {nll_mc:.3f} (multiple "
              f"choice), accuracy {acc_sft:.3f} vs {acc_mc:.3f}: the rule (lower NLL, accuracy within 1 point) picks "
              f"**{'the multiple-choice likelihood' if better == 'ours_mc' else 'SFT'}** over {len(seeds)} seed(s)."]
    return lines


def scale_curves() -> list[str]:
    """The validation NLL against the posterior scale (the paper's epsilon, or every learned width) per seed."""
    lines = []
    for job, what in (("ours_recommended", "epsilon of ours_mc"), ("ours_learned_recommended", "learned widths")):
        for seed in _seeds():
            record = _load(job, seed)
            if record is None or "scale" not in record:
                continue
            scale = record["scale"]
            curve = ", ".join(f"×{f:g}: {n:.3f}" for f, n in sorted(zip(scale["factors"], scale["nll"])))
            lines.append(f"- {job}, seed {seed} ({what}): mean adapter {scale['mean_nll']:.3f}; {curve}; "
                         f"chosen ×{scale['factor']:g}")
    return lines or ["- no posterior-scale job has run yet."]


def training_times() -> list[str]:
    """Training seconds per job (mean over seeds), and each against LoRA's; notes where a job shared the cores."""
    lora = [r["train_seconds"] for s in _seeds() if (r := _load("lora", s)) and "train_seconds" in r]
    if not lora:
        return ["- LoRA has not run yet."]
    lines = ["| job | seeds | training seconds | / LoRA | note |", "|---|---|---|---|---|"]
    for job in ("lora", "lora_mc", "ours", "ours_learned", "ours_mc", "blob", "peft_mc", "lora_m1", "lora_m2"):
        records = [r for s in _seeds() if (r := _load(job, s)) and "train_seconds" in r]
        if not records:
            continue
        seconds = float(np.mean([r["train_seconds"] for r in records]))
        notes = "; ".join(r["timing_note"] for r in records if r.get("timing_note"))
        lines.append(f"| {job} | {len(records)} | {seconds:.0f} | {seconds / float(np.mean(lora)):.2f} | {notes} |")
    lines += ["", "Same data and steps (2 epochs of 50 steps); the per-step curve scoring is not counted. A ratio "
              "is a step-time ratio only between jobs without a note (a note: something else ran on the cores)."]
    return lines


def lr_study() -> list[str]:
    """Accuracy and NLL across the learning rates, per method (test), and the spreads (worst to best)."""
    rates = sorted(set(LEARNING_RATES) | {PROTOCOL.lr})
    lines, spreads = [], {}
    header = "| method | " + " | ".join(f"lr {r:g}" for r in rates) + " | accuracy spread | NLL spread |"
    for method in ("lora", "ours", "ours_mean"):
        accs, nlls = [], []
        for rate in rates:
            seeds = [s for s in _seeds(rate) if method_outputs(method, s, rate) is not None]
            values = [set_metrics(method_outputs(method, s, rate)["test"]) for s in seeds]
            accs.append(float(np.mean([v["accuracy"] for v in values])) if values else None)
            nlls.append(float(np.mean([v["nll"] for v in values])) if values else None)
        done = [a for a in accs if a is not None]
        if len(done) < 2:
            continue
        spreads[method] = (max(done) - min(done), max(n for n in nlls if n is not None) - min(n for n in nlls if n is not None))
        cells = [f"{a:.3f} / {n:.3f}" if a is not None else "—" for a, n in zip(accs, nlls)]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {spreads[method][0]:.3f} | {spreads[method][1]:.3f} |")
    if not lines:
        return ["Learning-rate study: fewer than two learning rates have run."]
    out = ["Test accuracy / NLL (mean over the seeds run at each rate):", "", header,
           "|---|" + "---|" * (len(rates) + 2), *lines]
    if "lora" in spreads and "ours" in spreads:
        ratio = spreads["ours"][0] / spreads["lora"][0] if spreads["lora"][0] else float("nan")
        out += ["", f"Accuracy spread ours / LoRA = {ratio:.2f} (target <= 0.5): {'hit' if ratio <= 0.5 else 'missed'}."]
    return out


def _figure(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = _seeds()
    shown = [m for m in ("lora", "lora_ts", "ours", "ours_learned", "ours_mc", "blob")
             if seeds and method_outputs(m, seeds[0]) is not None]
    fig, axes = plt.subplots(1, len(shown) + 2, figsize=(3.2 * (len(shown) + 2), 3.2))
    for ax, method in zip(axes, shown):
        out = method_outputs(method, seeds[0])["test"]
        bins = calibration_bins(probs_of(out), torch.tensor(out["labels"]))
        centers = (torch.arange(15) + 0.5) / 15
        kept = bins["count"] > 0
        ax.bar(centers[kept], bins["accuracy"][kept], width=1 / 15, alpha=0.7, edgecolor="k")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy (ARC-Easy test)")
    for ax, key in zip(axes[-2:], ("nll", "ece")):
        for method in ("lora", "ours", "ours_learned", "ours_mc"):
            record = _load(method, seeds[0]) if seeds else None
            if record and record.get("curve"):
                ax.plot([p["step"] for p in record["curve"]], [p[key] for p in record["curve"]], marker="o", label=method)
        ax.set_xlabel("training step")
        ax.set_title(f"test {key.upper()} (mean adapter, {PROTOCOL.curve_rows} rows)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(command: str) -> str:
    table = summary()
    seeds = _seeds()
    lines = [
        "# Calibrated, robust fine-tuning where the LLM can do the task: SmolLM2-135M-Instruct on ARC-Easy",
        "",
        f"`{command}`, report written {datetime.date.today().isoformat()}; seeds found: {seeds or 'none'}. "
        f"Protocol (benchmarks/arc/data.py): {PROTOCOL.train_size} ARC-Easy train questions, by SFT on the right "
        "answer, or by the multiple-choice likelihood for lora_mc and ours_mc, "
        f"{PROTOCOL.epochs} epochs, batch {PROTOCOL.batch_size}, lr {PROTOCOL.lr:g}; val = {PROTOCOL.val_size} other "
        f"train questions (temperatures and scales are chosen there only); test = {PROTOCOL.test_size} ARC-Easy test "
        f"questions, shift = {PROTOCOL.shift_size} OpenBookQA, far = {PROTOCOL.far_size} BoolQ; scored as lm-eval "
        "scores them (probabilities over the choices from the summed log-likelihoods, each draw normalized then "
        "averaged; 15-bin ECE). Mean over seeds ± the 95% t-interval (no interval with one seed). Chance on ARC-Easy "
        "is about 0.25 (uniform NLL 1.39); zero-shot SmolLM2 is in zero_shot_llm.md.",
        "",
    ]
    for name, title in SETS.items():
        lines += [f"## {title}", "",
                  "| method | seeds | accuracy | accuracy_norm | NLL | Brier | ECE | AURC | confidence |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, description in METHODS.items():
            cells = table.get(method, {}).get(name)
            if not cells:
                continue
            lines.append(
                f"| {description} | {len(cells['accuracy'])} | {_cell(cells['accuracy'])} | "
                f"{_cell(cells.get('accuracy_norm', []))} | {_cell(cells['nll'])} | {_cell(cells['brier'])} | "
                f"{_cell(cells['ece'])} | {_cell(cells['aurc'])} | {_cell(cells['confidence'])} |"
            )
        lines.append("")
    lines += ["## Targets (issue #25)", "", *_targets(table), "", "## Targets of the learned width (issue #31)", "",
              *learned_targets(table), "", "## The likelihood: SFT or the multiple-choice likelihood", "",
              *likelihood_choice(table), "", "## Validation NLL against the posterior's scale", "",
              "The posterior-scale jobs score S = 4 draws per factor on val (the same draws for every factor).", "",
              *scale_curves(), "", "## Training time", "", *training_times(), "",
              "## Learning-rate robustness", "", *lr_study(), ""]
    report = "\n".join(lines)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "arc.md"), "w", encoding="utf-8") as handle:
        handle.write(report)
    with open(os.path.join(OUT, "arc.json"), "w", encoding="utf-8") as handle:
        json.dump({"command": command, "seeds": seeds, "table": table}, handle, indent=1, sort_keys=True)
    if seeds:
        _figure(os.path.join(OUT, "arc.png"))
    return report
