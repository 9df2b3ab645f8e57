"""The saved outputs of ``benchmarks.arc`` as report rows: per method, seed and set, the probabilities and metrics.

A row is a saved job (``lora``), a job's mean adapter (``ours_mean``), a job with a temperature fitted on val
(``lora_ts``) or the 3-LoRA ensemble; ``summary`` gathers every row's metrics over the seeds found, ``interval``
gives a mean with its 95% t-interval over seeds.

Example::

    from benchmarks.arc.outputs import method_outputs, set_metrics
    print(set_metrics(method_outputs("lora_ts", 0)["test"])["nll"])
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
from typing import Optional

import numpy as np
import torch

from pyro_monteclora.calibration import fit_temperature, temperature_scale
from pyro_monteclora.prediction.uncertainty import selective_prediction

from .data import PROTOCOL
from .jobs import RESULTS, job_path
from .methods import metrics

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
    "ours_learned_mc_mean": "ours, learned width, by the multiple-choice likelihood, mean adapter",
    "ours_learned_mc": f"ours, learned width, by the multiple-choice likelihood, predictive S = {PROTOCOL.samples}",
    "ours_learned_mc_ts": "ours learned-width multiple-choice predictive + temperature scaling",
    "bayesianize": "bayesianize(LoRA), fitted and scaled on val",
}
SETS = {"test": "ARC-Easy test", "shift": "OpenBookQA (shift)", "far": "BoolQ (far shift)"}
#: The 0.975 quantile of Student's t by degrees of freedom (1..30; beyond, the normal's 1.96 is within 4%).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.16, 14: 2.145, 15: 2.131, 16: 2.12, 17: 2.11, 18: 2.101, 19: 2.093, 20: 2.086,
         21: 2.08, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.06, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


@functools.lru_cache(maxsize=None)
def load_record(job: str, seed: int, lr: float = PROTOCOL.lr) -> Optional[dict]:
    path = job_path(job, seed, lr)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def seeds_found(lr: float = PROTOCOL.lr) -> list[int]:
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
        record = load_record(method[: -len("_ts")], seed, lr)
        if record is None:
            return None
        val = record["outputs"]["val"]
        temperature = fit_temperature(probs_of(val), torch.tensor(val["labels"]))
        return {**_scaled(record["outputs"], temperature), "temperature": temperature}
    if method == "ensemble":
        members = [load_record(job, seed, lr) for job in ("lora", "lora_m1", "lora_m2")]
        if any(m is None for m in members):
            return None
        return {name: {"log_probs": torch.stack([probs_of(m["outputs"][name]) for m in members]).mean(0).log().tolist(),
                       "labels": members[0]["outputs"][name]["labels"]} for name in members[0]["outputs"]}
    if method.endswith("_mean"):
        record = load_record(method[: -len("_mean")], seed, lr)
        return None if record is None else record["mean_adapter"]
    record = load_record(method, seed, lr)
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


def cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean, half = interval(values)
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def summary(lr: float = PROTOCOL.lr) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{method: {set: {metric: [per seed]}}}`` over the seeds found."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method in METHODS:
        for seed in seeds_found(lr):
            outputs = method_outputs(method, seed, lr)
            if outputs is None:
                continue
            for name in SETS:
                for key, value in set_metrics(outputs[name]).items():
                    table.setdefault(method, {}).setdefault(name, {}).setdefault(key, []).append(value)
    return table
