"""The report of ``benchmarks.arc``: ``benchmarks/results/arc.md`` (+ ``.json``, ``.png``) from the saved jobs.

Per method and set: accuracy, accuracy_norm (lm-eval's), NLL, Brier, ECE (15 bins), AURC and the
mean top probability, as the mean over seeds with a 95% t-interval (none for one seed); the targets
of issues #25 and #31 as paired differences over the seeds two rows share, each with its 95%
t-interval and stated hit or missed (on the mean, or with the whole interval); the recommended row
of ours chosen on validation NLL; the validation curves of the posterior scale; the learning-rate
study (:mod:`.lr_study`, its figure ``arc_lr.png``); a figure of reliability diagrams (test) and of
NLL / ECE against the training step.
"""

from __future__ import annotations

import datetime
import json
import os

import numpy as np
import torch

from pyro_monteclora.calibration import calibration_bins

from .data import PROTOCOL
from .lr_study import figure as lr_figure
from .lr_study import lr_study
from .outputs import METHODS, SETS, cell, load_record, method_outputs, probs_of, seeds_found, summary
from .targets import learned_targets, likelihood_choice, targets_25, time_ratio_cell

OUT = os.path.join("benchmarks", "results")


def scale_curves() -> list[str]:
    """The validation NLL against the posterior scale (the paper's epsilon, or every learned width) per seed."""
    lines = []
    for job, what in (("ours_recommended", "epsilon of ours_mc"), ("ours_learned_recommended", "learned widths")):
        for seed in seeds_found():
            record = load_record(job, seed)
            if record is None or "scale" not in record:
                continue
            scale = record["scale"]
            curve = ", ".join(f"×{f:g}: {n:.3f}" for f, n in sorted(zip(scale["factors"], scale["nll"])))
            lines.append(f"- {job}, seed {seed} ({what}): mean adapter {scale['mean_nll']:.3f}; {curve}; "
                         f"chosen ×{scale['factor']:g}")
    return lines or ["- no posterior-scale job has run yet."]


def training_times() -> list[str]:
    """Training seconds per job (mean over seeds), and each against LoRA's; notes where a job shared the cores."""
    lora = [r["train_seconds"] for s in seeds_found() if (r := load_record("lora", s)) and "train_seconds" in r]
    if not lora:
        return ["- LoRA has not run yet."]
    lines = ["| job | seeds | training seconds | / LoRA | / the same seed's LoRA, clean runs only | note |",
             "|---|---|---|---|---|---|"]
    for job in ("lora", "lora_mc", "ours", "ours_learned", "ours_mc", "ours_learned_mc", "blob", "peft_mc", "lora_m1",
                "lora_m2"):
        records = [r for s in seeds_found() if (r := load_record(job, s)) and "train_seconds" in r]
        if not records:
            continue
        seconds = float(np.mean([r["train_seconds"] for r in records]))
        notes = "; ".join(r["timing_note"] for r in records if r.get("timing_note"))
        paired = "" if job == "lora" else time_ratio_cell(job)
        lines.append(f"| {job} | {len(records)} | {seconds:.0f} | {seconds / float(np.mean(lora)):.2f} | {paired} | "
                     f"{notes} |")
    lines += ["", "Same data and steps (2 epochs of 50 steps); the per-step curve scoring is not counted. A ratio "
              "is a step-time ratio only between jobs without a note (a note: something else ran on the cores); the "
              "paired column divides each run that trained alone (no note, or a note that clears train_seconds) by "
              "the same seed's LoRA trained by the same likelihood (lora_mc's by LoRA by SFT), also alone. LoRA by SFT "
              "per seed: " + ", ".join(f"seed {s} {r['train_seconds']:.0f} s" for s in seeds_found()
                                       if (r := load_record("lora", s)) and "train_seconds" in r) + "."]
    return lines


def _figure(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = seeds_found()
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
            record = load_record(method, seeds[0]) if seeds else None
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
    seeds = seeds_found()
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
                f"| {description} | {len(cells['accuracy'])} | {cell(cells['accuracy'])} | "
                f"{cell(cells.get('accuracy_norm', []))} | {cell(cells['nll'])} | {cell(cells['brier'])} | "
                f"{cell(cells['ece'])} | {cell(cells['aurc'])} | {cell(cells['confidence'])} |"
            )
        lines.append("")
    lines += ["## Targets (issue #25)", "", *targets_25(table), "", "## Targets of the learned width (issue #31)", "",
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
    lr_figure(os.path.join(OUT, "arc_lr.png"))
    return report
