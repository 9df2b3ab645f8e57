"""The targets of issues #25 and #31 from the saved jobs: paired differences over shared seeds, 95% intervals.

Each target is ``metric(a) - factor * metric(b) - offset`` per seed, over the seeds both rows ran, stated hit
or missed on the mean or with the whole interval; the recommended row of ours is chosen on validation NLL.

Example::

    from benchmarks.arc.outputs import summary
    from benchmarks.arc.targets import learned_targets
    print("\n".join(learned_targets(summary())))
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .outputs import METHODS, SETS, cell, interval, load_record, method_outputs, seeds_found, set_metrics

#: The rows of ours a user could be given (the recipe is the one of them with the lowest validation NLL).
OURS_ROWS = ("ours", "ours_ts", "ours_mc", "ours_mc_ts", "ours_learned", "ours_learned_ts", "ours_learned_mc",
             "ours_learned_mc_ts", "ours_recommended", "ours_learned_recommended")


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
    candidates = validation_nll(table, rows)
    return min(candidates, key=candidates.get) if candidates else None


def validation_nll(table: dict, rows: tuple[str, ...] = OURS_ROWS) -> dict[str, float]:
    """The candidates of :func:`recommended_row` (the rows run on the most seeds) and their mean validation NLL
    over the seeds they share."""
    seeds = {m: {s for s in seeds_found() if method_outputs(m, s) is not None} for m in rows if m in table}
    if not seeds:
        return {}
    most = max(len(v) for v in seeds.values())
    run = [m for m, v in seeds.items() if len(v) == most]
    shared = sorted(set.intersection(*(seeds[m] for m in run)))
    return {m: float(np.mean([set_metrics(method_outputs(m, s)["val"])["nll"] for s in shared])) for m in run}


def paired_diff(a: str, b: str, name: str, key: str, factor: float = 1.0, offset: float = 0.0) -> str:
    """``key(a) - factor * key(b) - offset`` per seed (paired), with its verdict against 0."""
    diffs = []
    for seed in seeds_found():
        out_a, out_b = method_outputs(a, seed), method_outputs(b, seed)
        if out_a is not None and out_b is not None:
            diffs.append(set_metrics(out_a[name])[key] - factor * set_metrics(out_b[name])[key] - offset)
    if not diffs:
        return f"{a} and {b} share no seed"
    mean, half = interval(diffs)
    spread = "" if math.isnan(half) else f" ± {half:.3f}"
    return f"{mean:+.3f}{spread} over {len(diffs)} seed(s): {verdict(mean, half)}"


def targets_25(table: dict) -> list[str]:
    """Issue #25's targets for the recommended row of ours, each a paired difference over the shared seeds with
    its 95% interval, against LoRA trained by SFT and against LoRA trained by the same multiple-choice likelihood."""
    ours = recommended_row(table)
    if ours is None:
        return ["- no row of ours has run yet."]
    lines = [f"The recommended row, the row of ours with the lowest validation NLL: **{ours}**. Each line is "
             "the paired difference over the seeds both rows ran (mean ± 95% t-interval); the target holds when it "
             "is <= 0.", "", "Validation NLL of the candidates (the rows of ours run on the most seeds, mean over "
             "them): " + ", ".join(f"{m} {v:.3f}" for m, v in sorted(validation_nll(table).items(), key=lambda x: x[1]))
             + ".", ""]
    for lora in ("lora", "lora_mc"):
        if lora not in table:
            continue
        for name in ("test", "shift"):
            lines.append(
                f"- {SETS[name]}, against {lora}: ECE − {lora}_ts {paired_diff(ours, lora + '_ts', name, 'ece')}; "
                f"ECE − 0.4 × {lora} {paired_diff(ours, lora, name, 'ece', factor=0.4)}"
                + (f"; {lora} − 1 point − accuracy {paired_diff(lora, ours, name, 'accuracy', offset=0.01)}"
                   if name == "test" else ""))
    baselines = [m for m in table if m in METHODS and not m.startswith("ours")]
    for name in ("test", "shift"):
        lines.append(f"- {SETS[name]}, NLL below every other method: NLL − each baseline's, " + "; ".join(
            f"{m} {paired_diff(ours, m, name, 'nll')}" for m in baselines))
    return lines


#: The learned-width rows (#31): the predictive, its mean adapter, its temperature-scaled predictive.
LEARNED_JOBS = ("ours_learned", "ours_learned_mc")


def matched_lora(method: str) -> str:
    """The LoRA trained by the same likelihood as a row of ours (``lora_mc`` for the multiple-choice rows)."""
    return "lora_mc" if method.startswith(("ours_mc", "ours_recommended", "ours_learned_mc")) else "lora"


def learned_targets(table: dict) -> list[str]:
    """Issue #31's targets for the learned-width variant: paired differences over shared seeds, 95% intervals."""
    lines = []
    for job in LEARNED_JOBS:
        if job not in table:
            lines.append(f"- {job} has not run yet.")
            continue
        lora = matched_lora(job)
        for name in ("val", "test"):
            lines.append(f"- {job}, {name}: predictive NLL − its mean adapter's "
                         f"{paired_diff(job, job + '_mean', name, 'nll')}")
        for name in ("test", "shift"):
            lines.append(f"- {job}, {SETS[name]}: without TS, ECE − 0.5 × {lora}'s "
                         f"{paired_diff(job, lora, name, 'ece', factor=0.5)}; {lora} − 1 point − accuracy "
                         f"{paired_diff(lora, job, name, 'accuracy', offset=0.01)}")
        for name in ("test", "shift"):
            lines.append(f"- {job} + TS against {lora} + TS, {SETS[name]}: NLL "
                         f"{paired_diff(job + '_ts', lora + '_ts', name, 'nll')}; ECE "
                         f"{paired_diff(job + '_ts', lora + '_ts', name, 'ece')}")
        ratios = time_ratios(job)
        if ratios:
            lines.append(f"- {job}: training time / {lora}'s, paired clean runs, {time_ratio_cell(job)}, target "
                         f"<= 1.1: {verdict(*interval([r - 1.1 for r in ratios]))}")
        if "blob" in table:
            for name in ("test", "shift"):
                lines.append(f"- {job} against BLoB-style, {SETS[name]}: NLL {paired_diff(job, 'blob', name, 'nll')}; "
                             f"ECE {paired_diff(job, 'blob', name, 'ece')}; with TS on both, NLL "
                             f"{paired_diff(job + '_ts', 'blob_ts', name, 'nll')}; ECE "
                             f"{paired_diff(job + '_ts', 'blob_ts', name, 'ece')}")
    best = recommended_row(table, tuple(m for m in OURS_ROWS if m.endswith("_ts")))
    if best is not None:
        lora = matched_lora(best) + "_ts"
        for name in ("test", "shift"):
            lines.append(f"- the best variant + TS (chosen on val NLL: {best}), {SETS[name]}, against {lora}: NLL "
                         f"{paired_diff(best, lora, name, 'nll')}; ECE {paired_diff(best, lora, name, 'ece')}")
    return lines


def likelihood_choice(table: dict) -> list[str]:
    """SFT against the multiple-choice likelihood, for ours and for LoRA: decided on validation, reported on test."""
    seeds = [s for s in seeds_found() if method_outputs("ours", s) is not None and method_outputs("ours_mc", s) is not None]
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
            lines.append(f"| {who} | {label} | {name} | {len(runs)} | {cell([v['accuracy'] for v in values])} | "
                         f"{cell([v['nll'] for v in values])} | {cell([v['ece'] for v in values])} | "
                         f"{cell([v['aurc'] for v in values])} |")
            if name == "val" and method.startswith("ours"):
                chosen[method] = (float(np.mean([v["nll"] for v in values])),
                                  float(np.mean([v["accuracy"] for v in values])))
    (nll_sft, acc_sft), (nll_mc, acc_mc) = chosen["ours"], chosen["ours_mc"]
    better = "ours_mc" if nll_mc < nll_sft and acc_mc >= acc_sft - 0.01 else "ours"
    lines += ["", f"On validation (the only set that chooses), ours: NLL {nll_sft:.3f} (SFT) vs {nll_mc:.3f} (multiple "
              f"choice), accuracy {acc_sft:.3f} vs {acc_mc:.3f}: the rule (lower NLL, accuracy within 1 point) picks "
              f"**{'the multiple-choice likelihood' if better == 'ours_mc' else 'SFT'}** over {len(seeds)} seed(s)."]
    return lines


def clean_training(record: Optional[dict]) -> bool:
    """Whether a job's ``train_seconds`` was measured alone on the cores: it has no ``timing_note``, or its note
    says that only the scoring shared them ("... train_seconds is not")."""
    if not record or "train_seconds" not in record:
        return False
    note = record.get("timing_note", "")
    return not note or "train_seconds is not" in note


def time_ratios(job: str) -> list[float]:
    """``job``'s training seconds over those of the LoRA trained by the same likelihood, per seed where both runs
    trained alone on the cores (:func:`clean_training`): the step-time ratio, paired by seed."""
    lora = matched_lora(job)  # lora_mc's is LoRA by SFT
    ratios = []
    for seed in seeds_found():
        a, b = load_record(job, seed), load_record(lora, seed)
        if clean_training(a) and clean_training(b):
            ratios.append(a["train_seconds"] / b["train_seconds"])
    return ratios


def time_ratio_cell(job: str) -> str:
    """:func:`time_ratios` as a table cell: mean ± 95% t-interval and the number of seeds."""
    ratios = time_ratios(job)
    if not ratios:
        return "no clean pair"
    mean, half = interval(ratios)
    spread = "" if math.isnan(half) else f" ± {half:.2f}"
    return f"{mean:.2f}{spread} ({len(ratios)} seed(s))"
