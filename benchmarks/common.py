"""Shared pieces of the benchmarks: real tasks, the three fine-tuning methods, evaluation.

Every method sees the same tokenized examples, the same data order (a ``DataLoader`` shuffled
by a generator seeded with the run's seed), the same initialization (the classification head
and the LoRA factors are drawn after ``torch.manual_seed(seed)``), the same optimizer (AdamW,
no weight decay), schedule (linear decay after 3% warm-up), gradient clipping (1.0), LoRA
shape (r=16, alpha=32, dropout 0.05, ``"all-linear"``) and evaluation.

Methods:

- ``lora``: plain peft LoRA, cross-entropy loss.
- ``peft_mc``: peft's own MonteCLoRA variant (``LoraConfig(monteclora_config=MontecloraConfig())``),
  loss = cross-entropy + ``model.base_model._get_monteclora_loss()``; deterministic at eval
  (peft samples only in training), so it has no posterior predictive.
- ``ours``: :func:`pyro_monteclora.train`, evaluated with the mean adapter (``ours_mean``) and
  with the posterior predictive of S draws (``ours_pp``, a seeded ``Predictive``: the same
  S adapters for every test batch; S = 8, 4 in ``robustness.py --quick``).

Tasks (MiniLM classifiers, see :func:`load_task`):

- ``vader``: VADER lexicon words, label = sign of the mean rating; ``rating_std`` kept.
- ``boolq``: BoolQ questions without passage -> true / false (no passage exists in the shared
  copy). Train and test are class-balanced subsets, so the majority baseline is 50%.
- ``arc``: ARC-Easy as multiple-choice scoring: training is binary classification of
  (option, question) pairs (is this option correct?), each question's correct option and one
  random wrong one; at evaluation each question's 4 options are scored and the 4-way
  distribution is ``softmax_k(logit_1 - logit_0)`` of the options' log-odds. Only questions
  with 4 options whose pairs all fit 32 tokens are used. Majority baseline: the most frequent
  answer slot in the test subset.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

from pyro_monteclora.data import Collator, IndexedExamples, tokenize_classification
from pyro_monteclora.calibration import calibration_metrics, rank_correlation
from pyro_monteclora.examples import load_vader, minilm_path
from pyro_monteclora.prediction.predictive import Predictive

DATA_DIR = os.path.join("..", "shared", "data", "commonsense")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
LORA_OURS = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0
NUM_DRAWS = 8
ARC_MAX_TOKENS = 32
METHODS = ("lora", "peft_mc", "ours")


# ----------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A classification task: train/test ``Dataset``s with ``text`` (``text_pair``) and ``label``.

    ``group_size`` > 1 means multiple-choice scoring: consecutive test rows are one question's
    options, and ``answers`` holds the index of the correct one per question.
    """

    name: str
    train: Dataset
    test: Dataset
    max_length: int
    group_size: int = 1
    answers: Optional[np.ndarray] = None
    rating_std: Optional[np.ndarray] = None
    description: str = ""

    @property
    def eval_labels(self) -> np.ndarray:
        return self.answers if self.group_size > 1 else np.asarray(self.test["label"])

    @property
    def majority(self) -> float:
        labels = self.eval_labels
        return float(np.bincount(labels).max() / len(labels))


def _balanced(rows: list[dict], size: int, rng: np.random.Generator) -> list[dict]:
    by_label: dict[int, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    per_class = size // len(by_label)
    chosen = []
    for label in sorted(by_label):
        picks = rng.choice(len(by_label[label]), size=per_class, replace=False)
        chosen += [by_label[label][i] for i in picks]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _boolq_question(instruction: str) -> str:
    text = instruction.split("question:", 1)[-1]
    return text.split("\n\nAnswer format", 1)[0].strip()


def _load_json(name: str, split: str) -> list[dict]:
    with open(os.path.join(DATA_DIR, name, f"{split}.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _arc_items(name: str, split: str) -> list[tuple[str, list[str], int]]:
    items = []
    for row in _load_json(name, split):
        body = row["instruction"].split("question:", 1)[-1].split("\n\nAnswer format", 1)[0]
        question, _, options = body.partition("\n\n")
        parts = re.split(r"Answer\d+:\s*", options)[1:]
        answer = int(row["answer"].replace("answer", "")) - 1
        if len(parts) == 4 and 0 <= answer < 4:
            items.append((question.strip(), [p.strip() for p in parts], answer))
    return items


def load_task(name: str, train_size: int, test_size: int, seed: int = 0) -> Task:
    """One of ``vader``, ``boolq``, ``arc`` with ``train_size`` training examples (pairs for
    ``arc``: ``train_size`` // 2 questions) and ``test_size`` test examples (questions for arc)."""
    rng = np.random.default_rng(seed)
    if name == "vader":
        data = load_vader(seed=seed, test_size=test_size, train_size=train_size)
        return Task(
            "vader", data["train"], data["test"], max_length=16,
            rating_std=np.asarray(data["test"]["rating_std"]),
            description="VADER lexicon word -> sign of the mean human rating",
        )
    if name == "boolq":
        def rows(split):
            return [
                {"text": _boolq_question(r["instruction"]), "label": int(r["answer"] == "true")}
                for r in _load_json("boolq", split)
            ]
        return Task(
            "boolq",
            Dataset.from_list(_balanced(rows("train"), train_size, rng)),
            Dataset.from_list(_balanced(rows("test"), test_size, rng)),
            max_length=32,
            description="BoolQ question (no passage) -> true/false, class-balanced subsets",
        )
    if name == "arc":
        # only questions whose every (option, question) pair fits ARC_MAX_TOKENS: a 32-token
        # batch costs about half a 48-token one, so the same CPU budget trains on twice the
        # questions. The filtered subset is not the full ARC-Easy distribution (short questions).
        def short(items):
            tok = tokenizer()
            return [it for it in items if max(len(tok(o, it[0])["input_ids"]) for o in it[1]) <= ARC_MAX_TOKENS]

        train_items = short(_arc_items("ARC-Easy", "train"))
        test_items = short(_arc_items("ARC-Easy", "test"))
        train_items = [train_items[i] for i in rng.permutation(len(train_items))[: train_size // 2]]
        test_items = [test_items[i] for i in rng.permutation(len(test_items))[:test_size]]
        # training: each question's correct option and one wrong option drawn at random, so the
        # binary labels are balanced (all 3 wrong options would make "wrong" a 75% majority that
        # the small budget collapses to) and each question costs 2 sequences, not 4; the test
        # scores all 4 options.
        def pairs(items, all_options):
            rows = []
            for q, opts, a in items:
                ks = range(4) if all_options else [a, int(rng.choice([k for k in range(4) if k != a]))]
                rows += [{"text": opts[k], "text_pair": q, "label": int(k == a)} for k in ks]
            return rows

        train_rows, test_rows = pairs(train_items, False), pairs(test_items, True)
        return Task(
            "arc",
            Dataset.from_list(train_rows),
            Dataset.from_list(test_rows),
            max_length=ARC_MAX_TOKENS,
            group_size=4,
            answers=np.asarray([a for _, _, a in test_items]),
            description="ARC-Easy: (option, question) -> correct? (correct + 1 random wrong option per training question), scored as the 4-way softmax of the options' log-odds",
        )
    raise ValueError(f"unknown task {name!r}; use vader, boolq or arc")


# ------------------------------------------------------------------------------------- metrics
def calibration(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> dict[str, float]:
    """accuracy, nll, brier and ece (``num_bins`` equal-width bins) of predicted probabilities."""
    out = calibration_metrics(torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels).long(), num_bins)
    return {k: float(out[k]) for k in ("accuracy", "nll", "brier", "ece")}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (``pyro_monteclora.calibration.rank_correlation``); NaN, on purpose, where it
    is undefined: a run that collapsed to one class has a constant entropy."""
    try:
        return rank_correlation(torch.as_tensor(x), torch.as_tensor(y))
    except ValueError:
        return float("nan")


def entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of each row of probabilities (0 log 0 = 0)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    return (-torch.special.xlogy(p, p).sum(-1)).numpy()


# ------------------------------------------------------------------------------------ training
@dataclass
class RunResult:
    """Class probabilities on the test set (per example, or per question for multiple choice)."""

    method: str
    probs: dict[str, np.ndarray]  # evaluation name ("lora", "ours_mean", ...) -> probs
    seconds: float
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def load_minilm(seed: int):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    return model


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = AutoTokenizer.from_pretrained(minilm_path())
    return _TOKENIZER


def _loader(examples: list[dict], batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    # the same construction as pyro_monteclora.train's, so every method sees the same order
    return DataLoader(
        IndexedExamples(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=Collator(tokenizer().pad_token_id),
    )


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", "index")}


def peft_model(seed: int, variant: bool, model: Any = None, causal_lm: bool = False, **lora: Any):
    """MiniLM (or ``model``) with plain peft LoRA, or with peft's MonteCLoRA variant."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.lora.config import MontecloraConfig

    model = model if model is not None else load_minilm(seed)
    torch.manual_seed(seed)
    config = LoraConfig(
        **{**LORA, **lora},
        task_type=TaskType.CAUSAL_LM if causal_lm else TaskType.SEQ_CLS,
        bias="none",
        monteclora_config=MontecloraConfig() if variant else None,
    )
    return get_peft_model(model, config)


def adamw_epochs(model: Any, loader: DataLoader, loss_of: Callable[[Any, dict], torch.Tensor], optimizer: Any,
                 scheduler: Any, epochs: int, variant: bool = False,
                 on_epoch: Optional[Callable[[Any, int, float], None]] = None, device: Any = None,
                 on_step: Optional[Callable[[Any, int], None]] = None) -> None:
    """The one hand-written training step of the benchmarks' peft baselines: ``epochs`` passes over
    ``loader``, each batch ``loss_of(model, batch)`` (+ peft's MonteCLoRA loss when ``variant``),
    backward, clipping at ``MAX_GRAD_NORM``, an optimizer and a scheduler step. ``on_epoch(model,
    epoch, mean loss)`` after each epoch and ``on_step(model, step)`` after each step (they may
    score; the model is put back in training mode). The model ends in eval mode."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    step = 0
    for epoch in range(epochs):
        model.train()
        losses = []
        for batch in loader:
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            loss = loss_of(model, batch)
            losses.append(float(loss.detach()))
            if variant:
                loss = loss + model.base_model._get_monteclora_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            step += 1
            if on_step is not None:
                on_step(model, step)
                model.train()
        if on_epoch is not None:
            on_epoch(model, epoch + 1, float(np.mean(losses)))
    model.eval()


def train_peft(task: Task, variant: bool, lr: float, batch_size: int, epochs: int, seed: int) -> Any:
    """Plain peft LoRA (``variant=False``) or peft's MonteCLoRA variant, trained by AdamW."""
    examples = tokenize_classification(task.train, tokenizer(), task.max_length, 2)
    with torch.random.fork_rng():
        model = peft_model(seed, variant)
        torch.manual_seed(seed)
        loader = _loader(examples, batch_size, True, seed)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        total = epochs * len(loader)
        scheduler = get_scheduler(
            "linear", optimizer, num_warmup_steps=math.ceil(WARMUP_RATIO * total), num_training_steps=total
        )
        adamw_epochs(model, loader, lambda m, b: F.cross_entropy(m(**_inputs(b)).logits, b["labels"]), optimizer,
                     scheduler, epochs, variant)
    return model


def train_ours(task: Task, lr: float, batch_size: int, epochs: int, seed: int, **overrides: Any) -> Any:
    """pyro_monteclora.train with the same budget; returns the trained ``MonteCLoRA``."""
    import pyro_monteclora

    with torch.random.fork_rng():
        model = load_minilm(seed)
        result = pyro_monteclora.train(
            model,
            task.train,
            tokenizer=tokenizer(),
            learning_rate=lr,
            batch_size=batch_size,
            num_epochs=epochs,
            seed=seed,
            max_length=task.max_length,
            weight_decay=0.0,
            lr_scheduler="linear",
            warmup_ratio=WARMUP_RATIO,
            max_grad_norm=MAX_GRAD_NORM,
            eval_every_epoch=False,
            progress=False,
            **overrides,
        )
    return result.model


def _test_batches(task: Task, batch_size: int = 256):
    examples = tokenize_classification(task.test, tokenizer(), task.max_length, 2)
    return _loader(examples, batch_size, False, 0)


def _to_task_probs(task: Task, logits: torch.Tensor) -> np.ndarray:
    """Per-example 2-class probabilities, or per-question option probabilities for MC."""
    if task.group_size == 1:
        return logits.softmax(-1).double().numpy()
    log_odds = (logits[..., 1] - logits[..., 0]).reshape(*logits.shape[:-2], -1, task.group_size)
    return log_odds.softmax(-1).double().numpy()


@torch.no_grad()
def predict_deterministic(task: Task, forward) -> np.ndarray:
    logits = torch.cat([forward(_inputs(b)).float() for b in _test_batches(task)])
    return _to_task_probs(task, logits)


@torch.no_grad()
def predict_posterior(task: Task, monteclora: Any, num_draws: int = NUM_DRAWS, seed: int = 0):
    """Posterior predictive (mean over ``num_draws`` guide draws of the task probabilities) and
    the per-draw probabilities; the same ``num_draws`` adapters for every batch (seeded
    :class:`~pyro_monteclora.prediction.predictive.Predictive`). For multiple choice the 4-way distribution
    is formed per draw, then averaged."""
    predictive = Predictive(monteclora, num_samples=num_draws, seed=seed)
    logits = torch.cat([predictive.sample_logits(b).float() for b in _test_batches(task)], dim=1)
    draws = _to_task_probs(task, logits)
    return draws.mean(0), draws


def run_method(
    method: str, task: Task, lr: float, batch_size: int, epochs: int, seed: int, num_draws: int = NUM_DRAWS
) -> RunResult:
    start = time.perf_counter()
    if method in ("lora", "peft_mc"):
        model = train_peft(task, method == "peft_mc", lr, batch_size, epochs, seed)
        probs = {method: predict_deterministic(task, lambda x: model(**x).logits)}
        extra = {}
    elif method == "ours":
        mc = train_ours(task, lr, batch_size, epochs, seed)
        mean = predict_deterministic(task, lambda x: mc.network(**x).logits)
        pp, draws = predict_posterior(task, mc, num_draws=num_draws, seed=seed)
        probs = {"ours_mean": mean, "ours_pp": pp}
        extra = {"mutual_information": entropy(pp) - entropy(draws).mean(0)}
    else:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    return RunResult(method, probs, time.perf_counter() - start, extra)
