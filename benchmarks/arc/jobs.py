"""The jobs of ``benchmarks.arc``: one (method, seed[, learning rate]) each, saved when finished.

A job writes ``benchmarks/results/arc/<method>-s<seed>[-lr<lr>].json``: per set (val, test, shift,
far; val and test only at the learning-rate study's other rates) the predictive probabilities over
the choices, the mutual information, lm-eval's acc_norm picks and the labels; the training curve
(the protocol's rate only) and times. A finished job is never run again, so a cut run continues in a
later session. Trained adapters are kept under ``benchmarks/out/arc/`` (git ignored) for the jobs
derived from them, and retrained when missing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from ..calibration.jobs import save_job
from .data import PROTOCOL, load_rows
from .methods import (
    Curve, SUITE, base_model, call_with_scores, deterministic_scores, dropout_on, mean_scores, posterior_scores,
    repeated_scores, steps_per_epoch, suite_for, train_blob, train_lora, train_ours,
)

RESULTS = os.path.join("benchmarks", "results", "arc")
ADAPTERS = os.path.join("benchmarks", "out", "arc")
#: Jobs; lora_ts, ours_ts and the ensemble are formed from saved outputs at summary time.
JOBS = ("lora", "lora_mc", "ours", "ours_learned", "ours_mc", "ours_learned_mc", "ours_recommended",
        "ours_learned_recommended", "bayesianize", "blob", "peft_mc", "mc_dropout", "lora_m1", "lora_m2")
#: The peft LoRA jobs and their seed offsets (lora_mc: LoRA on the multiple-choice likelihood, lora's seed).
MEMBER_SEEDS = {"lora": 0, "lora_m1": 1000, "lora_m2": 2000, "lora_mc": 0}
SETS = ("val", "test", "shift", "far")
#: What a job of the learning-rate study (any rate but the protocol's) scores: the study compares test accuracy
#: and NLL across rates, and val fits the temperatures; the shift sets and the training curve are the protocol's.
LR_SETS = ("val", "test")
BAYESIANIZE = dict(num_epochs=2, learning_rate=1e-2)
#: The learned-width variant (#31): BLoB's prior scale, the guide at its own learning rate.
LEARNED = dict(variant="learned", prior_std=0.2, guide_learning_rate=0.05)
#: What each trained variant of ours passes to ``train`` on top of the paper's settings; ``ours_mc`` trains
#: by the multiple-choice likelihood (the label from a Categorical over the choices' scores) instead of SFT, and
#: ``ours_learned_mc`` is the learned-width variant by that likelihood.
OURS = {"ours": {}, "ours_learned": LEARNED, "ours_mc": dict(task="multiple_choice"),
        "ours_learned_mc": dict(LEARNED, task="multiple_choice")}
#: The posterior-scale jobs: the trained adapter of a job of ``OURS`` with its scale chosen on val (the paper
#: variant's epsilon, or every learned width: the validation NLL curve against the width, #31).
RECOMMENDED = {"ours_recommended": "ours_mc", "ours_learned_recommended": "ours_learned"}


def job_path(job: str, seed: int, lr: float = PROTOCOL.lr) -> str:
    suffix = "" if lr == PROTOCOL.lr else f"-lr{lr:g}"
    return os.path.join(RESULTS, f"{job}-s{seed}{suffix}.json")


def _adapter_folder(job: str, seed: int, lr: float) -> str:
    return os.path.join(ADAPTERS, os.path.basename(job_path(job, seed, lr))[: -len(".json")])


def _lora(rows: dict, seed: int, lr: float, job: str, record: dict, curve: bool) -> tuple[Any, Any]:
    """The LoRA of ``job`` from its saved folder, or trained (and saved) now."""
    from peft import PeftModel

    folder = _adapter_folder(job, seed, lr)
    if os.path.isdir(folder):
        model, tokenizer = base_model(suite_for(lr), seed + MEMBER_SEEDS[job])
        return PeftModel.from_pretrained(model, folder).eval(), tokenizer
    tokenizer = base_model(SUITE, 0)[1]
    points = Curve(rows["test"][: PROTOCOL.curve_rows], tokenizer, steps_per_epoch(PROTOCOL), PROTOCOL.curve_points) \
        if curve else None
    start = time.perf_counter()
    model, tokenizer = train_lora(rows["train"], seed + MEMBER_SEEDS[job], lr, points, choices=job == "lora_mc")
    record["train_seconds"] = time.perf_counter() - start - (points.seconds if points else 0.0)
    if points:
        record["curve"] = points.points
    model.save_pretrained(folder)
    return model, tokenizer


def _ours(rows: dict, seed: int, lr: float, record: dict, curve: bool, job: str = "ours") -> Any:
    import pyro_monteclora

    folder = _adapter_folder(job, seed, lr)
    if os.path.isdir(folder):
        model, tokenizer = base_model(suite_for(lr), seed)
        return pyro_monteclora.load(model, folder, tokenizer=tokenizer)
    tokenizer = base_model(SUITE, 0)[1]
    points = Curve(rows["test"][: PROTOCOL.curve_rows], tokenizer, steps_per_epoch(PROTOCOL), PROTOCOL.curve_points) \
        if curve else None
    if points:
        model, _ = base_model(SUITE, seed)
        points(model, 0, force=True)
    start = time.perf_counter()
    result = train_ours(rows["train"], seed, lr, points, **OURS[job])
    record["train_seconds"] = time.perf_counter() - start - (points.seconds if points else 0.0)
    if points:
        record["curve"] = points.points
    record["history_tail"] = result.history[-3:]
    pyro_monteclora.save_pretrained(result.model, folder)
    return result.model


def run_job(job: str, seed: int, lr: float = PROTOCOL.lr) -> dict:
    """Run one job (or return its saved record)."""
    path = job_path(job, seed, lr)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    rows = load_rows()
    record: dict[str, Any] = {"job": job, "seed": seed, "lr": lr, "samples": PROTOCOL.samples, "versions": _versions()}
    torch.manual_seed(seed)
    start = time.perf_counter()
    study = lr != PROTOCOL.lr
    sets = list(LR_SETS if study else SETS)
    if job in MEMBER_SEEDS:
        model, tokenizer = _lora(rows, seed, lr, job, record, curve=job == "lora" and not study)
        record["outputs"] = call_with_scores(lambda r: deterministic_scores(model, r, tokenizer), rows, sets)
    elif job == "mc_dropout":
        model, tokenizer = _lora(rows, seed, lr, "lora", {}, curve=False)
        dropout_on(model)
        record["outputs"] = call_with_scores(
            lambda r: repeated_scores(model, r, tokenizer, PROTOCOL.samples, seed), rows, sets)
    elif job == "peft_mc":
        t0 = time.perf_counter()
        model, tokenizer = train_lora(rows["train"], seed, lr, variant=True)
        record["train_seconds"] = time.perf_counter() - t0
        record["outputs"] = call_with_scores(lambda r: deterministic_scores(model, r, tokenizer), rows, sets)
    elif job == "blob":
        t0 = time.perf_counter()
        model, tokenizer, heads, history = train_blob(rows["train"], seed, lr)
        record.update(train_seconds=time.perf_counter() - t0, history_tail=history[-3:],
                      sigma_mean=float(torch.stack([h.sigma().mean() for h in heads]).mean()))
        model.eval()
        record["outputs"] = call_with_scores(
            lambda r: repeated_scores(model, r, tokenizer, PROTOCOL.samples, seed), rows, sets)
    elif job in OURS:
        monteclora = _ours(rows, seed, lr, record, curve=not study, job=job)
        record["mean_adapter"] = call_with_scores(lambda r: mean_scores(monteclora, r), rows, sets)
        record["outputs"] = call_with_scores(lambda r: posterior_scores(monteclora, r, PROTOCOL.samples, seed), rows, sets)
    elif job in RECOMMENDED:
        from pyro_monteclora.prediction.posterior_scale import tune_posterior_scale

        monteclora = _ours(rows, seed, lr, {}, curve=False, job=RECOMMENDED[job])
        choice = tune_posterior_scale(monteclora, rows["val"], num_samples=4, seed=seed)
        record["scale"] = {k: v for k, v in vars(choice).items()}
        record["outputs"] = call_with_scores(lambda r: posterior_scores(monteclora, r, PROTOCOL.samples, seed), rows, sets)
    elif job == "bayesianize":
        from pyro_monteclora import bayesianize
        from pyro_monteclora.prediction.posterior_scale import tune_posterior_scale

        from .data import sft_rows

        model, tokenizer = _lora(rows, seed, lr, "lora", {}, curve=False)
        t0 = time.perf_counter()
        fit = bayesianize(model, sft_rows(rows["val"]), tokenizer=tokenizer, progress=False, seed=seed,
                          batch_size=PROTOCOL.batch_size, max_length=PROTOCOL.max_length, gradient_checkpointing=False,
                          **BAYESIANIZE)
        record["fit_seconds"] = time.perf_counter() - t0
        choice = tune_posterior_scale(fit.model, rows["val"], num_samples=4, seed=seed, tokenizer=tokenizer)
        record["scale"] = {k: v for k, v in vars(choice).items()}
        record["outputs"] = call_with_scores(lambda r: posterior_scores(fit.model, r, PROTOCOL.samples, seed), rows, sets)
    else:
        raise ValueError(f"unknown job {job!r}; use one of {JOBS}")
    record["seconds"] = time.perf_counter() - start
    record["device"] = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    save_job(path, record)
    return record


def _versions() -> dict[str, str]:
    """The versions of the libraries that decide a job's numbers (recorded; the report pools jobs whatever they say)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "pyro-ppl"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found
