"""The suites and methods of ``benchmarks/calibration/protocol.py``: data, training, scoring.

Every method of a suite sees the same training subset, validation split and test sets, the same
budget (epochs, batch size, learning rate, schedule with warm-up and no step at learning rate 0,
AdamW without weight decay, clipping at 1.0), the same LoRA shape (r = 16, alpha = 32,
dropout 0.05, all-linear) and the same scoring (multiple choice over the task's answers for the
LLM suites; the class softmax for VADER). Its objective is the per-example NLL (sum over the
answer tokens for a causal LM), which is the NLL term of our ELBO.

- ``lora``: peft LoRA, the NLL alone (hand loop: AdamW + :func:`pyro_monteclora.train.run.lr_lambda`).
- ``peft_mc``: peft's MonteCLoRA variant, NLL + ``_get_monteclora_loss()``; deterministic at test.
- ``ours``: :func:`pyro_monteclora.train` (the package's path, on transformers' Trainer).
- derived: temperature scaling and the ensemble from saved LoRA outputs, MC dropout and
  ``bayesianize`` from the saved LoRA adapter, ``ours_improved`` from the saved ``ours`` adapter.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from ..common import adamw_epochs
from pyro_monteclora.data import Collator, IndexedExamples, encode_prompt_completion, format_instruction
from pyro_monteclora.data import tokenize_causal_lm, tokenize_classification
from pyro_monteclora.examples import load_vader, minilm_path
from pyro_monteclora.models.likelihood import IGNORE_INDEX, target_positions
from pyro_monteclora.monteclora import device_of
from pyro_monteclora.prediction.scoring import instruction_choices
from pyro_monteclora.prediction.shared_prompt import network_candidate_scores
from pyro_monteclora.train.run import lr_lambda

SHARED = os.path.join("..", "shared", "data")
#: Where the models run: the GPU when one is visible (the device tool's machine), else the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
WARMUP_RATIO, MAX_GRAD_NORM = 0.03, 1.0


@dataclass
class Suite:
    """One protocol: the model, the data sizes and the budget."""

    name: str
    model: str  # "minilm" or "smollm2"
    task: str  # vader, openbookqa, ARC-Easy, boolq
    train_size: int
    val_size: int
    test_size: int
    epochs: int
    lr: float
    batch_size: int
    max_length: int
    shift: Optional[tuple[str, int]] = None  # another task's test set
    ood: tuple[tuple[str, int], ...] = ()  # (task or "math", size)
    samples: int = 10


SUITES = {
    "vader": Suite("vader", "minilm", "vader", 256, 256, 1000, 20, 1e-3, 16, 16),
    "obqa": Suite("obqa", "smollm2", "openbookqa", 256, 100, 200, 5, 5e-4, 8, 256,
                  shift=("ARC-Easy", 200), ood=(("boolq", 100), ("math", 100))),
    "arc": Suite("arc", "smollm2", "ARC-Easy", 256, 100, 200, 5, 5e-4, 8, 256),
    "boolq": Suite("boolq", "smollm2", "boolq", 256, 100, 200, 5, 5e-4, 8, 256),
}
#: The obqa protocol run on a GPU (the device tool's machine): the same data, budget and scoring,
#: its own seeds and times, never mixed with the CPU runs' (another device, other round-off).
SUITES["obqa_gpu"] = replace(SUITES["obqa"], name="obqa_gpu")


# --- data ---------------------------------------------------------------------------------------------
def _json(*parts: str) -> list[dict]:
    with open(os.path.join(SHARED, *parts), encoding="utf-8") as handle:
        return json.load(handle)


def _pick(rows: list[dict], size: int, seed: int, skip: int = 0) -> list[dict]:
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[skip : skip + size]]


def load_suite_data(suite: Suite) -> dict[str, list[dict]]:
    """``train``, ``val``, ``test`` (+ ``shift``, ``ood_<name>``): fixed subsets (data seed 0) for every seed."""
    if suite.task == "vader":
        data = load_vader(seed=0, test_size=suite.test_size)
        pool = list(data["train"])
        return {"train": pool[: suite.train_size], "val": pool[suite.train_size : suite.train_size + suite.val_size],
                "test": list(data["test"])}
    def common(rows: list[dict]) -> list[dict]:  # one number of answers per task (ARC-Easy: 4 of 3..5)
        widths = [len(instruction_choices(r)[0]) for r in rows]
        modal = max(set(widths), key=widths.count)
        return [r for r, w in zip(rows, widths) if w == modal]

    train = common(_json("commonsense", suite.task, "train.json"))
    out = {
        "train": _pick(train, suite.train_size, 0),
        "val": _pick(train, suite.val_size, 0, skip=suite.train_size),
        "test": _pick(common(_json("commonsense", suite.task, "test.json")), suite.test_size, 1),
    }
    if suite.shift:  # questions with as many answers as the suite's (ARC-Easy has some with 3 or 5)
        width = len(instruction_choices(out["test"][0])[0])
        rows = [r for r in _json("commonsense", suite.shift[0], "test.json") if len(instruction_choices(r)[0]) == width]
        out["shift"] = _pick(rows, suite.shift[1], 2)
    for name, size in suite.ood:
        if name == "math":
            rows = [r for sub in ("gsm8k", "SVAMP", "AddSub", "SingleEq", "MultiArith") for r in _json("math", sub, "test.json")]
        else:
            rows = _json("commonsense", name, "test.json")
        out[f"ood_{name}"] = _pick(rows, size, 3)
    return out


# --- models -------------------------------------------------------------------------------------------
_PRISTINE: dict[str, Any] = {}


def base_model(suite: Suite, seed: int) -> tuple[Any, Any]:
    """A fresh base model and its tokenizer (the classification head drawn from ``seed``)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pyro_monteclora.quiet import quiet

    if suite.model == "minilm":
        with torch.random.fork_rng(), quiet():
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        return model.to(DEVICE), AutoTokenizer.from_pretrained(minilm_path())
    if "smollm2" not in _PRISTINE:
        from pyro_monteclora.examples import load_smollm2

        with quiet():
            _PRISTINE["smollm2"] = load_smollm2()
    model, tokenizer = _PRISTINE["smollm2"]
    return copy.deepcopy(model).to(DEVICE), tokenizer


def tokenizer_of(suite: Suite) -> Any:
    from transformers import AutoTokenizer

    if suite.model == "minilm":
        return AutoTokenizer.from_pretrained(minilm_path())
    if "smollm2" not in _PRISTINE:
        base_model(suite, 0)
    return _PRISTINE["smollm2"][1]


def examples(suite: Suite, rows: list[dict], tokenizer: Any) -> list[dict]:
    if suite.model == "minilm":
        return tokenize_classification(Dataset.from_list(rows), tokenizer, suite.max_length, 2)
    return tokenize_causal_lm(Dataset.from_list(rows), tokenizer, suite.max_length)


def nll_loss(suite: Suite, model: Any, batch: dict) -> torch.Tensor:
    """The per-example NLL of a batch (the NLL term of our ELBO), LM head on the answer positions."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    labels = batch["labels"]
    if suite.model == "minilm":
        return F.cross_entropy(model(**inputs).logits.float(), labels)
    positions, valid = target_positions(labels)
    logits = model(**inputs, logits_to_keep=positions).logits.float()
    targets = labels.gather(1, positions + 1)
    token_nll = F.cross_entropy(logits.transpose(1, 2), torch.where(valid, targets, IGNORE_INDEX), reduction="none",
                                ignore_index=IGNORE_INDEX)
    return token_nll.sum(1).mean()


def choice_nll(model: Any, batch: dict) -> torch.Tensor:
    """The per-row NLL of the multiple-choice likelihood (the Categorical over the choices' summed scores)."""
    from pyro_monteclora.models.choices import choice_log_likelihoods, choice_logits

    logits = choice_logits(choice_log_likelihoods(model, batch)[0][0], batch)
    return F.cross_entropy(logits, batch["labels"])


def train_plain(suite: Suite, rows: list[dict], seed: int, variant: bool = False,
                on_epoch: Optional[Callable[[Any, int, float], None]] = None,
                on_step: Optional[Callable[[Any, int], None]] = None, choices: bool = False) -> tuple[Any, Any]:
    """peft LoRA (``variant=False``) or peft's MonteCLoRA variant, by AdamW on the per-example NLL: of the
    SFT target, or with ``choices`` (multiple-choice rows) of the multiple-choice likelihood."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.lora.config import MontecloraConfig

    model, tokenizer = base_model(suite, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        task = TaskType.SEQ_CLS if suite.model == "minilm" else TaskType.CAUSAL_LM
        config = LoraConfig(**LORA, task_type=task, bias="none", monteclora_config=MontecloraConfig() if variant else None)
        model = get_peft_model(model, config)
        if choices:
            from pyro_monteclora.data.choice_examples import collate_choices, tokenize_multiple_choice

            data = tokenize_multiple_choice(rows, tokenizer, suite.max_length)
            collate, loss = (lambda items: collate_choices(items, tokenizer.pad_token_id)), choice_nll
        else:
            data, collate = examples(suite, rows, tokenizer), Collator(tokenizer.pad_token_id)
            loss = lambda m, b: nll_loss(suite, m, b)  # noqa: E731
        loader = torch.utils.data.DataLoader(
            IndexedExamples(data), batch_size=suite.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(seed), collate_fn=collate,
        )
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=suite.lr, weight_decay=0.0)
        total = suite.epochs * len(loader)
        warmup = min(math.ceil(WARMUP_RATIO * total), total - 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_lambda(k, warmup, total, "linear"))
        adamw_epochs(model, loader, loss, optimizer, scheduler, suite.epochs, variant, on_epoch, device_of(model),
                     on_step)
    return model, tokenizer


def train_ours(suite: Suite, rows: list[dict], seed: int, callbacks: list, **overrides: Any) -> Any:
    """:func:`pyro_monteclora.train` with the suite's budget (returns the ``TrainResult``)."""
    import pyro_monteclora

    model, tokenizer = base_model(suite, seed)
    return pyro_monteclora.train(
        model, rows, tokenizer=tokenizer, learning_rate=suite.lr, batch_size=suite.batch_size, num_epochs=suite.epochs,
        seed=seed, max_length=suite.max_length, weight_decay=0.0, lr_scheduler="linear", warmup_ratio=WARMUP_RATIO,
        max_grad_norm=MAX_GRAD_NORM, eval_every_epoch=False, progress=False, gradient_checkpointing=False,
        lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"], log_every=1000,
        callbacks=callbacks, **overrides,
    )


# --- scoring ------------------------------------------------------------------------------------------
def candidates_of(suite: Suite, rows: list[dict], reference: list[dict]) -> tuple[list[list[str]], list[int]]:
    """Candidates and answers; rows of another format (OOD) are scored over the suite's own answers."""
    own = instruction_choices(reference[0])[0]
    out, labels = [], []
    for row in rows:
        try:
            choices, label = instruction_choices(row)
        except ValueError:
            choices, label = own, -1
        if len(choices) != len(own):
            choices, label = own, -1
        out.append(choices)
        labels.append(label)
    return out, labels


def log_probs(suite: Suite, network: Any, rows: list[dict], tokenizer: Any, repeats: int,
              reference: list[dict], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-repeat class log-probabilities ``(repeats, n, C)`` and labels (-1: OOD rows) of any network.

    The caller sets modes (eval, or LoRA dropout on for MC dropout) and opens a noise context
    for MonteCLoRA draws (rows sample-major, ``repeats`` = S).
    """
    with torch.no_grad():
        if suite.model == "minilm":
            data = examples(suite, rows, tokenizer)
            parts = []
            for start in range(0, len(data), batch_size):
                batch = Collator(tokenizer.pad_token_id)(list(enumerate(data[start : start + batch_size])))
                inputs = {k: v.repeat(repeats, 1).to(device_of(network)) for k, v in batch.items()
                          if k not in ("labels", "index")}
                logits = network(**inputs).logits.float()
                parts.append(torch.log_softmax(logits, -1).reshape(repeats, -1, logits.shape[-1]))
            return torch.cat(parts, 1).double().cpu().numpy(), np.asarray([r["label"] for r in rows])
        choices, labels = candidates_of(suite, rows, reference)
        k = len(choices[0])
        prompts = [format_instruction(r) for r in rows]
        scored = encode_prompt_completion(tokenizer, [p for p in prompts for _ in range(k)], [c for cs in choices for c in cs])
        scores = network_candidate_scores(network, scored, k, tokenizer.pad_token_id, batch_size=16, repeats=repeats)
        return torch.log_softmax(scores.double(), -1).cpu().numpy(), np.asarray(labels)


@dataclass
class Outputs:
    """What a job saves per evaluation set: predictive probabilities and the uncertainty split."""

    probs: dict[str, list] = field(default_factory=dict)
    mean_log_probs: dict[str, list] = field(default_factory=dict)
    mutual_information: dict[str, list] = field(default_factory=dict)
    labels: dict[str, list] = field(default_factory=dict)

    def add(self, name: str, sample_log_probs: np.ndarray, labels: np.ndarray, keep_log_probs: bool = False) -> None:
        p = np.exp(sample_log_probs)
        mean = p.mean(0)
        entropy = -(mean * np.log(np.clip(mean, 1e-300, None))).sum(-1)
        expected = -(p * sample_log_probs).sum(-1).mean(0)
        self.probs[name] = mean.round(7).tolist()
        self.mutual_information[name] = np.clip(entropy - expected, 0, None).round(7).tolist()
        self.labels[name] = labels.tolist()
        if keep_log_probs:
            self.mean_log_probs[name] = sample_log_probs.mean(0).round(7).tolist()


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start
