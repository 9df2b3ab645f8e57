"""The learning-rate study of ``benchmarks.arc`` (#25, the paper's headline claim): LoRA and ours at 4 rates
spanning 10x, and the spread of test accuracy and NLL across them; beside them, a rate past the span
(``BEYOND_RATES``), where LoRA may break, as each method's change from its best rate in the span.

A spread is per seed: worst to best over the rates every seed ran for both methods compared (a spread
grows with the rates it covers, so all of them cover the same ones), then the mean over seeds with its
95% t-interval; the target (ours' accuracy spread <= 0.5x LoRA's) is the paired difference
``ours - 0.5 * lora`` per seed, stated with :func:`.targets.verdict`. The jobs at the rates other than
the protocol's score val and test only.

Example::

    python -c "from benchmarks.arc.lr_study import lr_study; print('\\n'.join(lr_study()))"
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import numpy as np

from .data import BEYOND_RATES, LEARNING_RATES, PROTOCOL
from .outputs import cell, interval, load_record, method_outputs, seeds_found, set_metrics
from .targets import clean_training, verdict

#: The rows of the study: the saved jobs (``lora``, ``ours``), ours' mean adapter, each with T fitted on val.
ROWS = ("lora", "lora_ts", "ours_mean", "ours", "ours_ts")
#: The pairs whose spreads are compared (ours' row, LoRA's row).
PAIRS = (("ours", "lora"), ("ours_mean", "lora"), ("ours_ts", "lora_ts"))
#: The study's rates (the spreads), and every rate shown (the tables, the figure).
SPAN = tuple(sorted(set(LEARNING_RATES) | {PROTOCOL.lr}))
RATES = tuple(sorted(set(SPAN) | set(BEYOND_RATES)))


@functools.lru_cache(maxsize=None)  # the tables, spreads and figure ask for the same (row, seed, rate) many times
def _test(method: str, seed: int, rate: float) -> Optional[dict[str, float]]:
    outputs = method_outputs(method, seed, rate)
    return None if outputs is None else set_metrics(outputs["test"])


def _seeds() -> list[int]:
    return sorted({s for rate in RATES for s in seeds_found(rate)})


def per_rate(metric: str) -> list[str]:
    """A table: ``metric`` on test per row and rate (mean ± interval over the seeds run there, and their count)."""
    lines = ["| method | " + " | ".join(f"lr {r:g}" for r in RATES) + " |", "|---|" + "---|" * len(RATES)]
    for method in ROWS:
        cells = []
        for rate in RATES:
            values = [m[metric] for s in seeds_found(rate) if (m := _test(method, s, rate)) is not None]
            cells.append(f"{cell(values)} ({len(values)})" if values else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _both(a: str, b: str, seed: int) -> list[float]:
    return [r for r in SPAN if _test(a, seed, r) is not None and _test(b, seed, r) is not None]


def common_rates(a: str, b: str) -> list[float]:
    """The rates of the span that every seed with two or more of them ran for both ``a`` and ``b``: a spread
    grows with the rates it covers, so the seeds' spreads are compared over the same rates."""
    sets = [set(both) for seed in _seeds() if len(both := _both(a, b, seed)) >= 2]
    return sorted(set.intersection(*sets)) if sets else []


def spreads(a: str, b: str, metric: str, rates: Optional[list[float]] = None) -> dict[int, tuple[float, float]]:
    """Per seed: (spread of ``a``, spread of ``b``) over ``rates`` (default: :func:`common_rates`), for every
    seed that ran them all for both."""
    rates = common_rates(a, b) if rates is None else rates
    found = {}
    for seed in _seeds():
        if len(rates) < 2 or not set(rates) <= set(_both(a, b, seed)):
            continue
        values_a = [_test(a, seed, r)[metric] for r in rates]
        values_b = [_test(b, seed, r)[metric] for r in rates]
        found[seed] = (max(values_a) - min(values_a), max(values_b) - min(values_b))
    return found


def own_spreads() -> list[str]:
    """Each seed's spreads over every rate it ran for ours and LoRA (wider than the common rates may be)."""
    lines = []
    for seed in _seeds():
        both = _both("ours", "lora", seed)
        if len(both) < 2 or both == common_rates("ours", "lora"):
            continue
        cells = []
        for metric in ("accuracy", "nll"):
            ours, lora = spreads("ours", "lora", metric, both)[seed]
            cells.append(f"{metric} ours {ours:.3f}, LoRA {lora:.3f}")
        lines.append(f"Seed {seed} over all the rates it ran (" + ", ".join(f"{r:g}" for r in both) + "): "
                     + "; ".join(cells) + ".")
    return lines


def spread_lines() -> list[str]:
    """The spreads of accuracy and NLL per pair: accuracy against the target (ours' <= 0.5x LoRA's), NLL
    against LoRA's (no target in #25: a smaller spread than LoRA's is the claim's direction)."""
    lines = ["| ours row / LoRA row | metric | seeds | spread of ours | spread of LoRA | paired: ours - factor x LoRA "
             "| verdict |", "|---|---|---|---|---|---|---|"]
    for a, b in PAIRS:
        for metric, factor in (("accuracy", 0.5), ("nll", 1.0)):
            if metric == "accuracy" and a.endswith("_ts"):
                continue  # a temperature keeps every argmax: the unscaled rows' accuracy
            found = spreads(a, b, metric)
            if not found:
                continue
            mean, half = interval([v[0] - factor * v[1] for v in found.values()])
            shown = "" if math.isnan(half) else f" ± {half:.3f}"
            lines.append(f"| {a} / {b} | {metric} | {len(found)} | {cell([v[0] for v in found.values()])} | "
                         f"{cell([v[1] for v in found.values()])} | {mean:+.3f}{shown} (factor {factor:g}) | "
                         f"{verdict(mean, half)} |")
    if len(lines) == 2:
        return ["Learning-rate study: no seed has run two rates of both LoRA and ours."]
    rates = ", ".join(f"{r:g}" for r in common_rates("ours", "lora"))
    return lines + ["", f"Over the rates every seed ran for both ({rates}); a spread is worst minus best over them. "
                    "The accuracy rows test #25's target (factor 0.5), the NLL rows whether ours' spread is below "
                    "LoRA's (factor 1).", *(["", *own] if (own := own_spreads()) else [])]


def best_case() -> list[str]:
    """The paper's other claim: ours' best-case test accuracy over the rates >= LoRA's (per seed, paired)."""
    diffs = []
    for seed in _seeds():
        both = _both("ours", "lora", seed)
        if len(both) >= 2:
            diffs.append(max(_test("ours", seed, r)["accuracy"] for r in both)
                         - max(_test("lora", seed, r)["accuracy"] for r in both))
    if not diffs:
        return []
    mean, half = interval(diffs)
    shown = "" if math.isnan(half) else f" ± {half:.3f}"
    return [f"Best-case test accuracy over the rates, ours - LoRA (per seed, the rates both ran): {mean:+.3f}{shown} "
            f"over {len(diffs)} seed(s); the claim (>= 0) is {verdict(-mean, half)}."]


def beyond() -> list[str]:
    """Past the span: per seed, each method's test accuracy and NLL at a rate of ``BEYOND_RATES`` minus its best
    over the span, and ours' change minus LoRA's (paired)."""
    lines = []
    for rate in BEYOND_RATES:
        for metric, best in (("accuracy", max), ("nll", min)):
            changes = []
            for seed in _seeds():
                both = _both("ours", "lora", seed)
                here = [_test(m, seed, rate) for m in ("ours", "lora")]
                if len(both) >= 2 and None not in here:
                    changes.append([here[i][metric] - best(_test(m, seed, r)[metric] for r in both)
                                    for i, m in enumerate(("ours", "lora"))])
            if changes:
                diffs = [c[0] - c[1] for c in changes]
                mean, half = interval(diffs)
                shown = "" if math.isnan(half) else f" ± {half:.3f}"
                lines.append(f"At lr {rate:g}, test {metric} minus its best over the span: ours "
                             f"{cell([c[0] for c in changes])}, LoRA {cell([c[1] for c in changes])}; ours - LoRA "
                             f"{mean:+.3f}{shown} over {len(changes)} seed(s).")
    return lines


def time_ratios() -> list[str]:
    """Ours' training seconds over LoRA's, per (seed, rate) at the study's other rates (no curve scoring there),
    for the pairs both trained alone on the cores (:func:`.targets.clean_training`)."""
    ratios = {}
    for rate in RATES:
        if rate == PROTOCOL.lr:
            continue  # the protocol's rate: the report's training-time section
        for seed in seeds_found(rate):
            ours, lora = load_record("ours", seed, rate), load_record("lora", seed, rate)
            if clean_training(ours) and clean_training(lora):
                ratios[(seed, rate)] = ours["train_seconds"] / lora["train_seconds"]
    if not ratios:
        return []
    mean, half = interval(list(ratios.values()))
    shown = "" if math.isnan(half) else f" ± {half:.2f}"
    return ["Training seconds, ours (SFT) / LoRA (SFT), the same seed and rate, both trained alone: "
            + ", ".join(f"seed {s} lr {r:g} {v:.2f}" for (s, r), v in sorted(ratios.items()))
            + f"; mean {mean:.2f}{shown} over {len(ratios)} pairs (a pair is two whole runs, one after the other)."]


def lr_study() -> list[str]:
    """The report section: accuracy and NLL per rate, the spreads, the target and the best case."""
    return ["Test accuracy per rate (mean ± 95% interval over the seeds run there; their count):", "",
            *per_rate("accuracy"), "", "Test NLL per rate:", "", *per_rate("nll"), "", "Test ECE per rate:", "",
            *per_rate("ece"), "", "Spreads across the rates (target: ours' accuracy spread <= 0.5x LoRA's):", "",
            *spread_lines(), "", *best_case(), "", *beyond(), "", *time_ratios()]


def figure(path: str) -> None:
    """Test accuracy, NLL and ECE against the learning rate (per seed, and the mean), per row; nothing until a
    rate other than the protocol's has run."""
    if not any(seeds_found(rate) for rate in RATES if rate != PROTOCOL.lr):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, metric in zip(axes, ("accuracy", "nll", "ece")):
        for color, method in enumerate(("lora", "lora_ts", "ours", "ours_ts")):
            if metric == "accuracy" and method.endswith("_ts"):
                continue  # a temperature keeps every argmax
            xs, means = [], []
            for rate in RATES:
                values = [m[metric] for s in seeds_found(rate) if (m := _test(method, s, rate)) is not None]
                if values:
                    xs.append(rate)
                    means.append(float(np.mean(values)))
                    ax.scatter([rate] * len(values), values, s=10, alpha=0.5, color=f"C{color}")
            if xs:
                ax.plot(xs, means, marker="o", label=method, color=f"C{color}")
        ax.set_xscale("log")
        ax.set_xticks(RATES, [f"{r:g}" for r in RATES])
        ax.minorticks_off()
        ax.set_xlabel("learning rate")
        ax.set_title(f"ARC-Easy test {metric if metric == 'accuracy' else metric.upper()} (dots: seeds)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
