"""The report of ``benchmarks/calibration/protocol.py``: targets met or missed, and the plots.

``write_report(summary, suites, seeds, command)`` writes ``benchmarks/results/calibration.md``
(tables, the targets with their figures and paired differences against LoRA), ``calibration.json``
(every seed's metrics) and ``calibration.png`` (training curves, reliability, selective
prediction, OOD score histograms).
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import torch

from .jobs import JOBS
from .methods import SUITES
from pyro_monteclora.calibration import calibration_bins
from pyro_monteclora.prediction.uncertainty import selective_prediction

OUT = os.path.join("benchmarks", "results")
#: the methods whose targets are stated: the scale chosen on validation, the lever study's two best on VADER, and
#: ``bayesianize`` (a posterior fitted on validation around a trained LoRA)
CANDIDATES = ("ours_improved", "ours_wide", "ours_column", "bayesianize")


def _training_seconds(record: dict, net: bool) -> float:
    """A job's training seconds, less its curve points' scoring seconds when ``net``."""
    return record["train_seconds"] - (sum(p["seconds"] for p in record.get("curve") or []) if net else 0.0)


def _mean(values):
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def _runs(summary, suite, method, key, metric):
    return {s: r[key][metric] for s, r in summary[suite][method].items() if key in r}


def _paired_text(summary, suite, method, key, metric, baseline="lora"):
    a, b = _runs(summary, suite, method, key, metric), _runs(summary, suite, baseline, key, metric)
    diff = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    if not diff:
        return "n/a"
    se = np.std(diff, ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return f"paired Δ vs {baseline} {np.mean(diff):+.3f} ± {se:.3f} (SE, {len(diff)} seeds)"


def targets(summary, suite, records, candidate: str = "ours_improved"):
    """``[(target, met, text)]`` of one candidate method on one suite (``records``: job records per (job, seed))."""
    out = []
    per = summary[suite]
    if not per[candidate] or not per["lora"]:
        return out

    seeds = set(per[candidate])  # every figure is over the candidate's seeds, so a method run on more is not favoured

    def m(method, key, metric):
        return _mean(v for s, v in _runs(summary, suite, method, key, metric).items() if s in seeds)

    ece, lora_ece, ts_ece = m(candidate, "test", "ece"), m("lora", "test", "ece"), m("lora_ts", "test", "ece")
    out.append(("ECE ≤ 0.4 × LoRA's and ≤ LoRA + TS's", ece <= 0.4 * lora_ece and ece <= ts_ece,
                f"{ece:.3f} vs 0.4 × {lora_ece:.3f} = {0.4 * lora_ece:.3f} and TS {ts_ece:.3f}; "
                + _paired_text(summary, suite, candidate, "test", "ece")))
    others = {k: m(k, "test", "nll") for k in per
              if k not in (*CANDIDATES, "ours_mean", "ours_column_mean") and seeds & set(per[k])}
    nll = m(candidate, "test", "nll")
    best_other = min(others, key=others.get)
    out.append(("NLL below every other method's", all(nll < v for v in others.values()),
                f"{nll:.3f}; best other {best_other} {others[best_other]:.3f}; "
                + _paired_text(summary, suite, candidate, "test", "nll")))
    acc, lora_acc = m(candidate, "test", "accuracy"), m("lora", "test", "accuracy")
    out.append(("accuracy ≥ LoRA's − 1 point", acc >= lora_acc - 0.01 - 1e-9,
                f"{100 * acc:.1f} vs {100 * lora_acc:.1f}; " + _paired_text(summary, suite, candidate, "test", "accuracy")))
    if any("shift" in r for r in per[candidate].values()):
        s_ece, s_nll = m(candidate, "shift", "ece"), m(candidate, "shift", "nll")
        l_ece, l_nll = m("lora", "shift", "ece"), m("lora", "shift", "nll")
        out.append(("under shift, ECE and NLL below LoRA's", s_ece < l_ece and s_nll < l_nll,
                    f"ECE {s_ece:.3f} vs {l_ece:.3f}, NLL {s_nll:.3f} vs {l_nll:.3f}; "
                    + _paired_text(summary, suite, candidate, "shift", "nll")))
    for key in sorted({k for r in per[candidate].values() for k in r if k.startswith("ood_")}):
        ours = max(m(candidate, key, "mutual_information"), m(candidate, key, "entropy"))
        base = m("lora", key, "max_probability")
        # A detector below chance does not beat anything: where LoRA's AUROC is under 0.5, chance is the reference.
        reference = max(base, 0.5)
        note = (f" (LoRA's max probability is below chance here, higher on the OOD rows, so the reference is chance, "
                f"0.5; turned around it would score {1 - base:.3f}, and {ours:.3f} "
                f"{'meets' if ours >= 1 - base + 0.05 else 'misses'} that + 0.05)" if base < 0.5 else "")
        out.append((f"OOD AUROC vs {key[4:]} (MI or entropy) ≥ LoRA max-prob + 5 points", ours >= reference + 0.05,
                    f"{ours:.3f} vs {reference:.3f} + 0.05 (LoRA: {base:.3f}){note}"))
    if candidate == "bayesianize":
        return out + _bayesianize_cost(records, seeds)
    trained = "ours" if candidate == "ours_improved" else candidate  # ours_improved rescales ours' adapter
    timed = [s for s in per["lora"] if (trained, s) in records and ("lora", s) in records
             and not any("timing_note" in records[(j, s)] for j in (trained, "lora"))
             and not np.isnan(records[(trained, s)].get("train_seconds", np.nan))]
    # Curve points timed since stop 20 carry their scoring seconds: the ratio then compares training alone.
    net = bool(timed) and all(p.get("seconds") is not None for s in timed for j in (trained, "lora")
                              for p in records[(j, s)].get("curve") or [])
    ratios = [_training_seconds(records[(trained, s)], net) / _training_seconds(records[("lora", s)], net) for s in timed]
    if ratios:
        curves = all(records[(trained, s)].get("curve") for s in timed)  # LoRA's timing includes its curve's scoring
        what = ("the per-epoch test-curve scoring taken out of both" if net else
                "both include the per-epoch test-curve scoring" if curves else
                f"LoRA's includes its per-epoch test-curve scoring, {trained}'s has none, so the ratio flatters {trained}")
        out.append(("training time ≤ 1.1 × LoRA's", _mean(ratios) <= 1.1,
                    f"{trained} / LoRA = {_mean(ratios):.2f} (per seed: {', '.join(f'{r:.2f}' for r in ratios)}; "
                    f"one shared CPU; {what})"))
    def per_row(record):  # seconds per scored row: ours_wide skips the validation split that LoRA's job scores
        return record["eval_seconds"] / sum(len(v) for v in record["outputs"]["labels"].values())

    ratios = [per_row(records[(trained, s)]) / per_row(records[("lora", s)])
              for s in timed if "eval_seconds" in records[(trained, s)]]
    if ratios:
        out.append(("S = 10 prediction ≤ 10 × one forward pass", _mean(ratios) <= 10,
                    f"S = 10 posterior predictive / one LoRA pass, per scored row = {_mean(ratios):.2f}"))
    skipped = [s for s in per["lora"] if (trained, s) in records and s not in timed]
    if skipped:
        out.append(("(timing)", True, f"seeds {skipped} left out of the time ratios: "
                    + "; ".join(dict.fromkeys(records[(j, s)]["timing_note"] for s in skipped for j in (trained, "lora")
                                              if "timing_note" in records[(j, s)]))))  # each note once
    return out


def _train_seconds(records, *jobs: str) -> float:
    """The training seconds of ``jobs``, mean over their records without a ``timing_note`` (NaN if none)."""
    return _mean([r["train_seconds"] for (j, _), r in records.items() if j in jobs and "timing_note" not in r])


def _bayesianize_cost(records, seeds) -> list:
    """``bayesianize``'s training-time target: its posterior fit comes on top of a LoRA already trained. The
    reference is a LoRA training without curve scoring: the ensemble members' (the same data and steps)."""
    fits = [records[("bayesianize", s)]["fit_seconds"] for s in seeds if ("bayesianize", s) in records]
    lora = _train_seconds(records, "lora_m1", "lora_m2")
    if not fits or np.isnan(lora):
        return []
    ratio = (lora + _mean(fits)) / lora
    return [("training time ≤ 1.1 × LoRA's", ratio <= 1.1,
             f"(LoRA + fit) / LoRA = {ratio:.2f}: the fit takes {_mean(fits):.0f} s (per seed: "
             f"{', '.join(f'{f:.0f}' for f in fits)}) on top of a LoRA's {lora:.0f} s (the ensemble members' mean); "
             "the validation scale search after the fit is not timed by the job")]


def scale_lines(records, job: str) -> list[str]:
    """The validation-chosen scale of ``job`` per seed: the factor on the trained epsilon and the validation NLL
    there against the unscaled posterior's (factor 1): a boundary choice or a large gain on 100 rows is a warning."""
    found = sorted((s, r["scale"]) for (j, s), r in records.items() if j == job and "scale" in r)
    if not found:
        return []
    def val_nll(scale, factor):
        return scale["nll"][scale["factors"].index(factor)] if factor in scale["factors"] else float("nan")
    return [f"- {job}: validation-chosen scale per seed: " + "; ".join(
        f"seed {s}: x{c['factor']:.3g} of the trained epsilon (largest tried x{max(c['factors']):.3g}), validation NLL "
        f"{val_nll(c, c['factor']):.3f} vs {val_nll(c, 1.0):.3f} unscaled" for s, c in found)]


def ensemble_cost_lines(records) -> list[str]:
    """The 3-LoRA ensemble's cost: three trainings of the same steps and three forward passes per prediction,
    with each member's measured training seconds (seed mean; LoRA's own include its test-curve scoring)."""
    seconds = {job: _train_seconds(records, job) for job in ("lora", "lora_m1", "lora_m2")}
    if any(np.isnan(v) for v in seconds.values()):
        return []
    return ["", "**Ensemble cost**: 3 LoRAs, each trained with the same data and steps as plain LoRA (3× its training "
            "compute and adapter storage), and 3 forward passes per prediction (the S = 10 methods take 10). Training "
            "seconds per member, seed mean: " + ", ".join(f"{job} {v:.0f}" for job, v in seconds.items())
            + " (LoRA's include its per-epoch test-curve scoring; the members have none)."]


def robustness_lines(path: str = os.path.join(OUT, "calibration_lr.json")) -> list[str]:
    """The learning-rate target, read from ``calibration/lr.py``'s table (``[]`` before that script has run)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    table, lrs = saved["table"], [k for k in saved["table"].get("lora", {}) if k not in ("spread", "diverged")]
    head = ["", f"**Learning-rate robustness (ours, paper settings; seeds {saved['seeds']}; "
            "[calibration_lr.md](calibration_lr.md))**", ""]
    done = {n: sum(1 for k, v in table.get(n, {}).items() if k not in ("spread", "diverged") and isinstance(v, dict))
            for n in ("lora", "ours")}
    if len(lrs) < 4 or min(done.values()) < 4:
        return head + [f"- not evaluated yet: {done['lora']} of 4 LoRA and {done['ours']} of 4 ours learning rates run"]
    ratio = table["ours"]["spread"] / table["lora"]["spread"]
    return head + [f"- {'met' if ratio <= 0.5 else 'MISSED'}: worst-to-best accuracy spread over lr "
                   f"{', '.join(lrs)} ≤ 0.5 × LoRA's: {table['ours']['spread']:.3f} vs {table['lora']['spread']:.3f} "
                   f"(ratio {ratio:.2f}; mean adapter {table['ours_mean']['spread']:.3f}); one seed, so each spread "
                   "carries about ±0.045 of binomial noise"]


def _plot(summary, suites, seeds, outputs_of, records_of, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(suites), 4, figsize=(18, 4 * len(suites)), squeeze=False)
    for row, suite in zip(axes, suites):
        records = records_of(suite)
        for method, color in (("lora", "tab:blue"), ("ours", "tab:red")):
            curves = [records[(method, s)]["curve"] for s in seeds if (method, s) in records and records[(method, s)].get("curve")]
            if curves:
                epochs = [p["epoch"] for p in curves[0]]
                for key, style in (("train_nll", ":"), ("test_nll", "-")):
                    values = np.mean([[p[key] for p in c] for c in curves], 0)
                    row[0].plot(epochs, values, style, color=color, label=f"{method} {key.replace('_', ' ')}")
        row[0].set_title(f"{suite}: NLL per epoch (mean adapter, seed mean)")
        row[0].set_xlabel("epoch")
        row[0].legend(fontsize=7)
        for method, color in (("lora", "tab:blue"), ("lora_ts", "tab:green"), ("ours_improved", "tab:red"),
                              ("ours_wide", "tab:orange"), ("ours_column", "tab:brown"), ("ensemble", "tab:purple")):
            pooled = [outputs_of(suite, method, s) for s in seeds]
            pooled = [o["test"] for o in pooled if o is not None]
            if not pooled:
                continue
            probs = torch.tensor(np.concatenate([p for p, _, _ in pooled]))
            labels = torch.tensor(np.concatenate([y for _, _, y in pooled]))
            bins = calibration_bins(probs, labels, 15)
            filled = bins["count"] > 0
            row[1].plot(bins["confidence"][filled], bins["accuracy"][filled], "o-", color=color, label=method, ms=3)
            curve = selective_prediction(probs, labels)
            row[2].plot(curve["coverage"], curve["accuracy"], color=color, label=f"{method} (AURC {curve['aurc']:.3f})")
        row[1].plot([0, 1], [0, 1], "--", color="gray")
        row[1].set_title(f"{suite}: reliability (test, seeds pooled)")
        row[1].set_xlabel("confidence")
        row[1].set_ylabel("accuracy")
        row[1].legend(fontsize=7)
        row[2].set_title(f"{suite}: selective prediction (test)")
        row[2].set_xlabel("coverage")
        row[2].legend(fontsize=7)
        shown = CANDIDATES[0]
        runs = [outputs_of(suite, shown, s) for s in seeds]
        runs = [o for o in runs if o is not None]
        oods = sorted(k for k in (runs[0] if runs else {}) if k.startswith("ood_"))
        if oods:
            inside = np.concatenate([o["test"][1] for o in runs])
            row[3].hist(inside, bins=30, alpha=0.5, density=True, label="test (in distribution)")
            for key in oods:
                row[3].hist(np.concatenate([o[key][1] for o in runs]), bins=30, alpha=0.5, density=True, label=key[4:])
            row[3].set_title(f"{suite}: mutual information of {shown}")
            row[3].legend(fontsize=7)
        else:
            row[3].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(summary, suites, seeds, command, tables, outputs_of, load):
    """Write ``calibration.md``, ``.json`` and ``.png``; returns the markdown text."""
    def records_of(suite):
        found = {(job, s): load(suite, job, s) for job in JOBS for s in seeds}
        return {k: v for k, v in found.items() if v is not None}

    lines = [
        "# Calibration, shift and OOD detection where LoRA overfits",
        "",
        f"Command: `{command}`; date: {datetime.date.today()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). Seeds finished per method are in each table; S = 10, 15-bin ECE.",
        "",
    ]
    for suite in suites:
        spec = SUITES[suite]
        records = records_of(suite)
        lines += [f"## {suite}", "",
                  f"{spec.model}, {spec.task}: {spec.train_size} training examples x {spec.epochs} epochs, batch "
                  f"{spec.batch_size}, lr {spec.lr:g}; validation {spec.val_size}, test {spec.test_size}"
                  + (f"; shift: {spec.shift[0]} ({spec.shift[1]})" if spec.shift else "")
                  + (f"; OOD: {', '.join(f'{n} ({k})' for n, k in spec.ood)}" if spec.ood else "") + ".", ""]
        curves = [records[("lora", s)]["curve"] for s in seeds if ("lora", s) in records and records[("lora", s)].get("curve")]
        if curves:
            lines.append("LoRA's training curve (mean adapter, seed mean): " + ", ".join(
                f"epoch {p['epoch']}: train NLL {np.mean([c[i]['train_nll'] for c in curves]):.3f} / test NLL "
                f"{np.mean([c[i]['test_nll'] for c in curves]):.3f}" for i, p in enumerate(curves[0])) + ".")
        lines.append(tables[suite])
        for candidate in CANDIDATES:
            found = targets(summary, suite, records, candidate)
            if found:
                lines += ["", f"**Targets ({candidate}, mean over its seeds {sorted(summary[suite][candidate])})**", ""]
                if candidate in ("ours_wide", "ours_column") and suite == "vader":
                    what = "training epsilon 0.05" if candidate == "ours_wide" else "column prior, KL weight 0.1"
                    lines += [f"{candidate} ({what}) was picked by the lever study on this test split "
                              "(calibration_levers.md), so these VADER figures are not independent evidence for it.", ""]
                lines += [f"- note: {text}" if name == "(timing)" else f"- {'met' if ok else 'MISSED'}: {name}: {text}"
                          for name, ok, text in found]
                if candidate in ("ours_improved", "bayesianize"):
                    lines += scale_lines(records, candidate)
        lines += ensemble_cost_lines(records)
        if suite == "obqa":
            lines += robustness_lines()
        lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(OUT, "calibration.md"), "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    with open(os.path.join(OUT, "calibration.json"), "w", encoding="utf-8") as handle:
        json.dump({"command": command, "date": str(datetime.date.today()), "summary": summary}, handle, indent=1, sort_keys=True)
    _plot(summary, suites, seeds, outputs_of, records_of, os.path.join(OUT, "calibration.png"))
    return text
