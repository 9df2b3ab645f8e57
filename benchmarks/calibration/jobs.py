"""The jobs of ``benchmarks/calibration/protocol.py``: one (suite, method, seed) each, saved when finished.

A job trains (or loads a saved adapter), scores every evaluation set of the suite and writes
``benchmarks/results/calibration/<suite>/<method>-s<seed>.json``: per set, the predictive
probabilities, the mutual information and the labels (-1 on out-of-distribution rows), plus
the training curve and the times. A finished job is never run again, so a long run continues
where it stopped, in this session or a later one. Trained adapters are kept under
``benchmarks/out/calibration/`` for the jobs derived from them (retrained if missing).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import numpy as np
import torch

from .methods import (
    DEVICE, Outputs, Suite, base_model, load_suite_data, log_probs, timed, tokenizer_of, train_ours, train_plain,
)

RESULTS = os.path.join("benchmarks", "results", "calibration")
ADAPTERS = os.path.join("benchmarks", "out", "calibration")
#: job -> what it needs; derived methods (lora_ts, ensemble) are formed from saved outputs at summary time.
JOBS = ("lora", "ours", "ours_improved", "peft_mc", "mc_dropout", "bayesianize", "lora_m1", "lora_m2", "ours_wide",
        "ours_column")
MEMBER_SEEDS = {"lora": 0, "lora_m1": 1000, "lora_m2": 2000}
BAYESIANIZE = dict(num_epochs=2, learning_rate=1e-2)
#: ``ours_wide``: trained with epsilon = 0.05 (10x the paper's 5e-3), the noise acting during training;
#: the lever study's best on VADER (``benchmarks/results/calibration_levers.md``), added as a method afterwards.
WIDE = dict(sample_scaler=0.05)
#: ``ours_column``: the prior on A~'s columns with an empirical-Bayes scale, its KL weighted by 0.1 (the
#: paper's epsilon): the lever study's best weight on VADER, added as a method afterwards.
COLUMN = dict(column_prior=True, kl_weight=0.1)


def job_path(suite: Suite, job: str, seed: int) -> str:
    return os.path.join(RESULTS, suite.name, f"{job}-s{seed}.json")


def save_job(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    os.replace(tmp, path)


def _sets(data: dict, with_val: bool) -> list[str]:
    return [k for k in data if k != "train" and (with_val or k != "val")]


def _curve_point(suite: Suite, network: Any, tokenizer: Any, data: dict, epoch: int, train_nll: float) -> dict:
    """Test NLL and accuracy of the mean adapter after ``epoch``, with the ``seconds`` the scoring took
    (the report takes them out of the training time)."""
    was = network.training
    network.eval()
    (lp, labels), seconds = timed(lambda: log_probs(suite, network, data["test"], tokenizer, 1, data["train"]))
    network.train(was)
    picked = lp[0][np.arange(len(labels)), labels]
    return {"epoch": epoch, "train_nll": train_nll, "test_nll": float(-picked.mean()),
            "test_accuracy": float((lp[0].argmax(-1) == labels).mean()), "seconds": seconds}


def score_deterministic(suite, network, tokenizer, data, outputs, with_val, keep=False) -> None:
    network.eval()
    for name in _sets(data, with_val):
        lp, labels = log_probs(suite, network, data[name], tokenizer, 1, data["train"])
        outputs.add(name, lp, labels, keep_log_probs=keep)


def score_posterior(suite, monteclora, tokenizer, data, outputs, with_val, seed) -> None:
    from pyro_monteclora.layers import noise_context
    from pyro_monteclora.prediction.draws import eval_mode
    from pyro_monteclora.prediction.predictive import Predictive

    noise = Predictive(monteclora, suite.samples, seed=seed).draw_noise()
    with eval_mode(monteclora), noise_context(monteclora.groups, noise):
        for name in _sets(data, with_val):
            lp, labels = log_probs(suite, monteclora.network, data[name], tokenizer, suite.samples, data["train"])
            outputs.add(name, lp, labels)


def _lora_adapter(suite: Suite, data: dict, seed: int, job: str = "lora",
                  timing: Optional[dict] = None, curve: bool = False) -> tuple[Any, Any, list, float]:
    """The LoRA of ``job`` (member seed offset), from its saved folder or trained (and saved) now.

    With ``curve`` (the ``lora`` job's own), each epoch's test point is scored, and the training
    seconds include that scoring; MC dropout and bayesianize reuse the LoRA and need no curve.
    ``timing`` (a job's record) gets ``epoch_seconds``: each epoch's training seconds, its curve
    scoring left out (the first includes the setup: model copy, adapter injection, tokenization).
    """
    from peft import PeftModel

    folder = os.path.join(ADAPTERS, suite.name, f"{job}-s{seed}")
    if os.path.isdir(folder):
        model, tokenizer = base_model(suite, seed + MEMBER_SEEDS[job])
        return PeftModel.from_pretrained(model, folder).eval(), tokenizer, [], float("nan")
    points: list = []
    ends = [time.perf_counter()]  # the end of each epoch's training (after the previous curve point)

    def on_epoch(model, epoch, train_nll):
        if timing is not None:
            timing.setdefault("epoch_seconds", []).append(time.perf_counter() - ends[-1])
        if curve:
            points.append(_curve_point(suite, model, tokenizer_of(suite), data, epoch, train_nll))
        ends.append(time.perf_counter())

    (model, tokenizer), seconds = timed(lambda: train_plain(suite, data["train"], seed + MEMBER_SEEDS[job], on_epoch=on_epoch))
    model.save_pretrained(folder)
    return model, tokenizer, points, seconds


def _epoch_timer(record: dict) -> Any:
    """A Trainer callback that appends each epoch's training seconds to ``record["epoch_seconds"]``
    (put it first: callbacks after it, such as the curve's scoring, are left out)."""
    from transformers import TrainerCallback

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.start = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001
            record.setdefault("epoch_seconds", []).append(time.perf_counter() - self.start)

    return EpochTimer()


def _ours_adapter(suite: Suite, data: dict, seed: int, timing: Optional[dict] = None) -> tuple[Any, Any, list, float]:
    import pyro_monteclora
    from transformers import TrainerCallback

    folder = os.path.join(ADAPTERS, suite.name, f"ours-s{seed}")
    if os.path.isdir(folder):
        model, tokenizer = base_model(suite, seed)
        return pyro_monteclora.load(model, folder), tokenizer, [], float("nan")
    curve: list = []
    tokenizer = tokenizer_of(suite)

    class Curve(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            curve.append(_curve_point(suite, model.network, tokenizer, data, len(curve) + 1, float("nan")))

    timers = [_epoch_timer(timing)] if timing is not None else []
    result, seconds = timed(lambda: train_ours(suite, data["train"], seed, timers + [Curve()]))
    steps_per_epoch = len(result.history) // suite.epochs
    for point in curve:  # training NLL per example, averaged over the epoch's steps
        chunk = result.history[(point["epoch"] - 1) * steps_per_epoch : point["epoch"] * steps_per_epoch]
        point["train_nll"] = float(np.mean([r["nll"] for r in chunk]))
    pyro_monteclora.save_pretrained(result.model, folder)
    return result.model, tokenizer, curve, seconds


def run_job(suite: Suite, job: str, seed: int) -> dict:
    """Run one job (or return its saved record)."""
    path = job_path(suite, job, seed)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    data = load_suite_data(suite)
    outputs, record = Outputs(), {"suite": suite.name, "job": job, "seed": seed}
    record["device"] = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    torch.manual_seed(seed)
    if job in MEMBER_SEEDS:
        model, tokenizer, curve, seconds = _lora_adapter(suite, data, seed, job, timing=record, curve=job == "lora")
        _, record["eval_seconds"] = timed(lambda: score_deterministic(suite, model, tokenizer, data, outputs, job == "lora", keep=True))
        record.update(curve=curve, train_seconds=seconds)
    elif job == "mc_dropout":
        model, tokenizer, _, record["lora_train_seconds"] = _lora_adapter(suite, data, seed, timing=record)  # NaN: loaded
        model.eval()
        for name, module in model.named_modules():
            if "lora_dropout" in name and isinstance(module, torch.nn.Dropout):
                module.train()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for name in _sets(data, False):
                lp, labels = log_probs(suite, model, data[name], tokenizer, suite.samples, data["train"])
                outputs.add(name, lp, labels)
    elif job == "bayesianize":
        from pyro_monteclora import bayesianize
        from pyro_monteclora.prediction.posterior_scale import tune_posterior_scale

        model, tokenizer, _, record["lora_train_seconds"] = _lora_adapter(suite, data, seed, timing=record)  # NaN: loaded
        fit, seconds = timed(lambda: bayesianize(model, data["val"], tokenizer=tokenizer, progress=False, seed=seed,
                                                 batch_size=suite.batch_size, max_length=suite.max_length,
                                                 gradient_checkpointing=False, **BAYESIANIZE))
        choice = tune_posterior_scale(fit.model, data["val"], num_samples=4, seed=seed, tokenizer=tokenizer)
        record.update(fit_seconds=seconds, scale=vars(choice))
        score_posterior(suite, fit.model, tokenizer, data, outputs, False, seed)
    elif job == "peft_mc":
        (model, tokenizer), seconds = timed(lambda: train_plain(suite, data["train"], seed, variant=True))
        record["train_seconds"] = seconds
        score_deterministic(suite, model, tokenizer, data, outputs, False)
    elif job == "ours":
        monteclora, tokenizer, curve, seconds = _ours_adapter(suite, data, seed, timing=record)
        record.update(curve=curve, train_seconds=seconds)
        mean = Outputs()
        score_deterministic(suite, monteclora.network, tokenizer, data, mean, True, keep=True)
        record["mean_adapter"] = vars(mean)
        _, record["eval_seconds"] = timed(lambda: score_posterior(suite, monteclora, tokenizer, data, outputs, True, seed))
    elif job == "ours_wide":
        result, record["train_seconds"] = timed(lambda: train_ours(suite, data["train"], seed, [_epoch_timer(record)], **WIDE))
        _, record["eval_seconds"] = timed(
            lambda: score_posterior(suite, result.model, tokenizer_of(suite), data, outputs, False, seed))
    elif job == "ours_column":
        result, record["train_seconds"] = timed(lambda: train_ours(suite, data["train"], seed, [_epoch_timer(record)], **COLUMN))
        record["kl_per_example"] = result.history[-1]["kl"]
        mean = Outputs()  # is the gain the posterior's, or the prior's pull on the mean adapter?
        score_deterministic(suite, result.model.network, tokenizer_of(suite), data, mean, True, keep=True)
        record["mean_adapter"] = vars(mean)
        _, record["eval_seconds"] = timed(
            lambda: score_posterior(suite, result.model, tokenizer_of(suite), data, outputs, True, seed))
    elif job == "ours_improved":
        from pyro_monteclora.prediction.posterior_scale import tune_posterior_scale

        monteclora, tokenizer, _, _ = _ours_adapter(suite, data, seed)
        choice = tune_posterior_scale(monteclora, data["val"], num_samples=4, seed=seed, tokenizer=tokenizer)
        record["scale"] = vars(choice)
        score_posterior(suite, monteclora, tokenizer, data, outputs, False, seed)
    else:
        raise ValueError(f"unknown job {job!r}; use one of {JOBS}")
    record["outputs"] = vars(outputs)
    save_job(path, record)
    return record
