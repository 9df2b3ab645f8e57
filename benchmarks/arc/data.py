"""The protocol of ``benchmarks.arc``: SmolLM2-135M-Instruct fine-tuned on ARC-Easy, scored like lm-eval.

Every method sees the same rows, budget and scoring:

- **train**: 400 ARC-Easy train questions, **val**: 100 other ARC-Easy train questions (the only
  rows anything is chosen on: temperatures, posterior scales), fixed for every seed (data seed 0);
- **test**: 500 ARC-Easy test questions (data seed 1); **shift**: 200 OpenBookQA test questions
  (BLoB's out-of-distribution rows for an ARC-trained model); **far**: 100 BoolQ test questions
  (no/yes, without the passage the shared copy lacks);
- rows are the paper's instruction rows converted by :mod:`pyro_monteclora.data.choices` (3 to 5
  choices on ARC-Easy are kept as they are: the scoring handles any count);
- training is SFT on the right continuation (prompt ``"Question: q\\nAnswer:"``, completion
  ``" " + right choice``, EOS appended) unless a method says otherwise: 2 epochs, batch 8, learning
  rate 5e-4 (the LR study varies it), linear schedule with 3% warm-up, AdamW without weight decay,
  clipping at 1.0, LoRA r = 16, alpha = 32, dropout 0.05, all-linear;
- scoring: lm-eval's context and continuation, the probabilities over a row's choices from the
  summed log-likelihoods, each draw normalized and then averaged; S = 8 draws; 15-bin ECE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pyro_monteclora.data.choices import context, load_choice_rows

DATA = os.path.join("..", "shared", "data", "commonsense")


@dataclass(frozen=True)
class Protocol:
    train_size: int = 400
    val_size: int = 100
    test_size: int = 500
    shift_size: int = 200
    far_size: int = 100
    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-4
    max_length: int = 128
    samples: int = 8
    curve_rows: int = 200  # test rows scored along training (mean adapter) for the calibration-vs-step figure
    curve_points: int = 4  # per epoch


PROTOCOL = Protocol()
#: The learning rates of the robustness study (10x span, the paper's headline claim).
LEARNING_RATES = (1e-4, 2e-4, 5e-4, 1e-3)
#: A rate past that span (3x its top), where LoRA may break: shown beside the study, outside its spreads.
BEYOND_RATES = (3e-3,)


def _pick(rows: list[dict], size: int, seed: int, skip: int = 0) -> list[dict]:
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[skip : skip + size]]


def load_rows(protocol: Protocol = PROTOCOL) -> dict[str, list[dict]]:
    """``train``, ``val``, ``test``, ``shift`` (OpenBookQA) and ``far`` (BoolQ) multiple-choice rows."""
    train = load_choice_rows(os.path.join(DATA, "ARC-Easy", "train.json"))
    return {
        "train": _pick(train, protocol.train_size, 0),
        "val": _pick(train, protocol.val_size, 0, skip=protocol.train_size),
        "test": _pick(load_choice_rows(os.path.join(DATA, "ARC-Easy", "test.json")), protocol.test_size, 1),
        "shift": _pick(load_choice_rows(os.path.join(DATA, "openbookqa", "test.json")), protocol.shift_size, 2),
        "far": _pick(load_choice_rows(os.path.join(DATA, "boolq", "test.json")), protocol.far_size, 3),
    }


def sft_rows(rows: list[dict]) -> list[dict]:
    """Prompt/completion rows for SFT on the right continuation."""
    return [{"prompt": context(r), "completion": " " + r["choices"][r["label"]]} for r in rows]
