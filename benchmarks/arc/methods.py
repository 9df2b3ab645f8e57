"""Training and scoring of the methods of ``benchmarks.arc`` (see :mod:`.data` for the protocol).

- ``lora``: peft LoRA by SFT (the calibration benchmark's hand loop: AdamW, the linear schedule);
  ``lora_mc``: the same loop on the multiple-choice likelihood (the NLL of the Categorical over the choices);
  ``lora_m1``/``lora_m2``: the same with other seeds, the ensemble's members; MC dropout reuses ``lora``.
- ``peft_mc``: peft's MonteCLoRA variant (NLL + its own loss), deterministic at test.
- ``blob``: the BLoB-style mean-field Gaussian on A (:mod:`.blob`).
- ``ours``: :func:`pyro_monteclora.train` with the paper's settings, by SFT; ``ours_learned`` the
  learned-width variant (#31); ``ours_mc`` the paper's settings by the multiple-choice likelihood,
  ``ours_learned_mc`` the learned width by it.
- derived: temperature scaling (any ``<job>_ts``, T fitted on val), the ensemble, ``ours_recommended``
  (``ours_mc``'s adapter with the posterior scale chosen on val), ``ours_learned_recommended``
  (``ours_learned``'s adapter with every learned width scaled by the factor chosen on val),
  ``bayesianize`` (of the saved LoRA, fitted on val).

Scores are per-draw summed log-likelihoods of every choice, ``(S, n, K)``, as lm-eval computes them
(:func:`pyro_monteclora.prediction.choices.network_choice_scores` / ``score_choices``).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np
import torch

from pyro_monteclora.calibration import calibration_metrics
from pyro_monteclora.data import Collator, IndexedExamples
from pyro_monteclora.prediction.choices import choice_predictive, network_choice_scores, score_choices

from ..calibration.methods import LORA, MAX_GRAD_NORM, WARMUP_RATIO, Suite, base_model, examples, nll_loss
from ..calibration.methods import train_ours as _train_ours
from ..calibration.methods import train_plain
from . import blob
from .data import PROTOCOL, Protocol, sft_rows

SUITE = Suite("arc_lm", "smollm2", "ARC-Easy", PROTOCOL.train_size, PROTOCOL.val_size, PROTOCOL.test_size,
              PROTOCOL.epochs, PROTOCOL.lr, PROTOCOL.batch_size, PROTOCOL.max_length, samples=PROTOCOL.samples)


def suite_for(lr: float) -> Suite:
    return SUITE if lr == SUITE.lr else replace(SUITE, name=f"arc_lm_lr{lr:g}", lr=lr)


def summary_of(scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What a job saves of one set: predictive log-probabilities (not rounded probabilities: a tiny
    probability of the right answer is what makes an NLL), MI, acc_norm's picks, labels (JSON lists)."""
    out = choice_predictive(scores)
    return {"log_probs": out["probs"].double().log().numpy().round(6).tolist(),
            "mutual_information": out["mutual_information"].double().numpy().round(7).tolist(),
            "prediction_norm": out["prediction_norm"].tolist(),
            "labels": scores["labels"].tolist()}


def metrics(probs: Any, labels: Any) -> dict[str, float]:
    return calibration_metrics(torch.as_tensor(np.asarray(probs)), torch.as_tensor(np.asarray(labels)))


class Curve:
    """Mean-adapter NLL / ECE / accuracy on ``rows`` at evenly spaced training steps (and step 0)."""

    def __init__(self, rows: list[dict], tokenizer: Any, steps_per_epoch: int, points_per_epoch: int) -> None:
        self.rows, self.tokenizer, self.points, self.seconds = rows, tokenizer, [], 0.0
        self.every = max(1, steps_per_epoch // points_per_epoch)

    def __call__(self, network: Any, step: int, force: bool = False) -> None:
        """Score a point at every ``every``-th step (``force``: now); its seconds are kept apart."""
        if step % self.every and not force:
            return
        start = time.perf_counter()
        was = network.training
        network.eval()
        scores = network_choice_scores(network, self.rows, self.tokenizer)
        network.train(was)
        point = metrics(choice_predictive(scores)["probs"], scores["labels"])
        self.points.append({"step": step, **point})
        self.seconds += time.perf_counter() - start


def steps_per_epoch(protocol: Protocol) -> int:
    return math.ceil(protocol.train_size / protocol.batch_size)


def train_lora(rows: list[dict], seed: int, lr: float, curve: Optional[Curve] = None, variant: bool = False,
               choices: bool = False) -> tuple:
    """peft LoRA (or peft's MonteCLoRA variant) by SFT, or with ``choices`` by the multiple-choice
    likelihood; the curve scored every few steps."""
    suite = suite_for(lr)
    if curve is not None:
        model, tokenizer = base_model(suite, seed)
        curve(model, 0, force=True)  # zero-shot: step 0
    return train_plain(suite, rows if choices else sft_rows(rows), seed, variant=variant, choices=choices,
                       on_step=(lambda model, step: curve(model, step)) if curve is not None else None)


def train_ours(rows: list[dict], seed: int, lr: float, curve: Optional[Curve] = None, **overrides: Any) -> Any:
    """:func:`pyro_monteclora.train` (paper settings unless overridden) by SFT, or by the multiple-choice
    likelihood with ``task="multiple_choice"``; returns the ``TrainResult``."""
    from transformers import TrainerCallback

    callbacks = []
    if curve is not None:
        class Points(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
                curve(model.network, state.global_step)

        callbacks.append(Points())
    data = rows if overrides.get("task") == "multiple_choice" else sft_rows(rows)
    return _train_ours(suite_for(lr), data, seed, callbacks, **overrides)


def train_blob(rows: list[dict], seed: int, lr: float) -> tuple[Any, Any, list]:
    """The BLoB-style baseline: peft LoRA with a learned Gaussian on A (flipout), two optimizers."""
    from peft import LoraConfig, TaskType, get_peft_model

    from pyro_monteclora.train.run import lr_lambda

    suite = suite_for(lr)
    model, tokenizer = base_model(suite, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(**LORA, task_type=TaskType.CAUSAL_LM, bias="none"))
        heads = blob.attach(model)
        data = examples(suite, sft_rows(rows), tokenizer)
        loader = torch.utils.data.DataLoader(
            IndexedExamples(data), batch_size=suite.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(seed), collate_fn=Collator(tokenizer.pad_token_id),
        )
        total = suite.epochs * len(loader)
        warmup = min(math.ceil(WARMUP_RATIO * total), total - 1)
        history = blob.train_steps(model, heads, loader, lambda m, b: nll_loss(suite, m, b), suite.lr,
                                   lambda k: lr_lambda(k, warmup, total, "linear"), suite.epochs, MAX_GRAD_NORM)
    return model, tokenizer, heads, history


def deterministic_scores(network: Any, rows: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
    network.eval()
    return network_choice_scores(network, rows, tokenizer)


def repeated_scores(network: Any, rows: list[dict], tokenizer: Any, repeats: int, seed: int) -> dict[str, torch.Tensor]:
    """Scores of a network that draws its own noise in every pass (MC dropout, BLoB), seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return network_choice_scores(network, rows, tokenizer, repeats=repeats)


def posterior_scores(monteclora: Any, rows: list[dict], samples: int, seed: int) -> dict[str, torch.Tensor]:
    return score_choices(monteclora, rows, num_samples=samples, seed=seed)


def mean_scores(monteclora: Any, rows: list[dict]) -> dict[str, torch.Tensor]:
    return score_choices(monteclora, rows, mode="mean")


def dropout_on(model: Any) -> None:
    """MC dropout: the model in eval mode except LoRA's dropout layers."""
    model.eval()
    for name, module in model.named_modules():
        if "lora_dropout" in name and isinstance(module, torch.nn.Dropout):
            module.train()


def call_with_scores(function: Callable[[list[dict]], dict], rows: dict[str, list[dict]], sets: list[str]) -> dict:
    return {name: summary_of(function(rows[name])) for name in sets}
