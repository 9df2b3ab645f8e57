"""``evaluate(monteclora, dataset)``: calibration of the mean adapter and of the posterior predictive.

For a classification model the dataset has ``text``/``label`` columns (tokenized as in
training). For a causal LM it holds multiple-choice rows ``question``/``choices``/``label``,
scored as lm-evaluation-harness scores them (:mod:`~pyro_monteclora.prediction.choices`:
``accuracy`` and ``accuracy_norm`` are lm-eval's ``acc`` and ``acc_norm`` for the mean adapter),
or the paper's instruction rows (``instruction``, ``input``, ``output``, ``answer``), scored in
the paper's label format by :func:`~pyro_monteclora.prediction.scoring.multiple_choice` over the
answers allowed by the row's ``Answer format: a/b/...`` (``label_format=True``; convert them
with :func:`pyro_monteclora.data.choices.instruction_to_choice_row` to score them like lm-eval).

Example:
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert, toy_tokenizer
    >>> mc = MonteCLoRA.from_model(tiny_bert(vocab_size=6), lora_r=4)
    >>> data = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    >>> result = evaluate(mc, data, num_samples=2, tokenizer=toy_tokenizer(["good", "bad"]))
    >>> sorted(result), sorted(result["predictive"])
    (['mean', 'predictive'], ['accuracy', 'aurc', 'brier', 'ece', 'nll'])
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from datasets import Dataset, DatasetDict

from ..calibration import calibration_metrics
from ..quiet import quiet
from ..data.choices import is_choice_data
from ..data.tokenize import DataLike, batches, load_data, pad_token_id, tokenize_classification
from .predictive import Predictive, tokenizer_of
from .choices import choice_predictive, score_choices
from .scoring import instruction_choices, multiple_choice

__all__ = ["evaluate", "evaluation_outputs", "predictive_outputs"]


def _evaluation_split(data: Any) -> Dataset:
    data = load_data(data)
    if isinstance(data, DatasetDict):
        for split in ("test", "validation", "eval"):
            if split in data:
                return data[split]
        raise ValueError(f"a DatasetDict to evaluate needs a test/validation/eval split, got {sorted(data)}")
    return data


def predictive_outputs(
    monteclora: Any,
    dataset: DataLike,
    num_samples: int = 8,
    mode: str = "sample",
    batch_size: int = 32,
    seed: Optional[int] = 0,
    tokenizer: Any = None,
    vectorize: bool = True,
    length_normalized: bool = False,
) -> dict[str, torch.Tensor]:
    """``labels`` and the :class:`~pyro_monteclora.prediction.predictive.Predictive` outputs (``probs``,
    ``entropy``, ``expected_entropy``, ``mutual_information``) of one mode over a whole dataset:
    ``text``/``label`` rows for a classifier; for a causal LM, multiple-choice rows (which add
    ``log_likelihood`` and ``prediction_norm``, see :func:`~pyro_monteclora.prediction.choices.choice_predictive`;
    ``length_normalized`` as there) or the paper's instruction rows."""
    data = _evaluation_split(dataset)
    if len(data) == 0:
        raise ValueError("the evaluation dataset is empty")
    tokenizer = tokenizer_of(monteclora, tokenizer)
    if monteclora.task == "classification":
        config = monteclora.network.config
        examples = tokenize_classification(
            data, tokenizer, monteclora.monteclora_config.max_length, config.num_labels, getattr(config, "label2id", None)
        )
        predictive = Predictive(monteclora, num_samples, seed, mode, vectorize=vectorize)
        parts = [predictive(b) for b in batches(examples, pad_token_id(tokenizer), batch_size)]
        return {"labels": torch.tensor([e["label"] for e in examples]), **{k: torch.cat([p[k] for p in parts]) for k in parts[0]}}
    if is_choice_data(data.column_names):
        scores = score_choices(monteclora, list(data), num_samples, seed, mode, tokenizer, batch_size, vectorize)
        return {"labels": scores["labels"], **choice_predictive(scores, length_normalized)}
    if "instruction" not in data.column_names:
        raise ValueError(
            "a causal LM is evaluated on multiple-choice rows (question, choices, label) or the paper's "
            f"instruction rows (instruction, output, answer); the dataset has columns {data.column_names}"
        )
    rows = list(data)
    choices = [instruction_choices(row) for row in rows]
    result = multiple_choice(
        monteclora, rows, [c for c, _ in choices], num_samples, seed, mode, tokenizer, batch_size, vectorize=vectorize
    )
    outputs = {k: v for k, v in result.items() if k != "sample_log_likelihood"}
    return {"labels": torch.tensor([label for _, label in choices]), **outputs}


def evaluation_outputs(
    monteclora: Any,
    dataset: DataLike,
    num_samples: int = 8,
    batch_size: int = 32,
    seed: Optional[int] = 0,
    tokenizer: Any = None,
    vectorize: bool = True,
    length_normalized: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-example outputs behind :func:`evaluate`: ``labels`` and, for ``"mean"`` and
    ``"predictive"``, :func:`predictive_outputs` over the whole dataset."""
    outputs: dict[str, Any] = {}
    for name, mode in (("mean", "mean"), ("predictive", "sample")):
        out = predictive_outputs(monteclora, dataset, num_samples, mode, batch_size, seed, tokenizer, vectorize,
                                 length_normalized)
        outputs["labels"] = out.pop("labels")
        outputs[name] = out
    return outputs


def evaluate(
    monteclora: Any,
    dataset: DataLike,
    num_samples: int = 8,
    batch_size: int = 32,
    num_bins: int = 15,
    seed: Optional[int] = 0,
    tokenizer: Any = None,
    return_curves: bool = False,
    length_normalized: bool = False,
) -> dict[str, Any]:
    """``{"mean": metrics, "predictive": metrics}``: ``accuracy``, ``nll``, ``brier``, ``ece``, ``aurc``
    (and ``accuracy_norm`` for multiple-choice rows).

    ``mean`` uses the mean adapter (plain LoRA), ``predictive`` the posterior predictive with
    ``num_samples`` adapters drawn from the guide (the same S draws for every batch, seeded by
    ``seed``; the caller's RNG is untouched). ``dataset``: a ``Dataset``, a ``DatasetDict``
    (its ``test``/``validation`` split), a list of rows or a local file. A causal LM is
    evaluated by multiple choice: rows ``question``/``choices``/``label`` (choices per row may
    differ in number) as lm-eval scores them, where ``accuracy_norm`` is lm-eval's ``acc_norm``
    and the calibration metrics use the probabilities over the choices from the summed
    log-likelihoods, each draw's normalized then averaged (``length_normalized=True``: from the
    log-likelihoods divided by each choice's length in characters); or the paper's instruction
    rows (label format).

    ``aurc`` is the area under the risk-coverage curve of selective prediction (answer the most
    confident examples first; lower is better, see
    :func:`pyro_monteclora.prediction.uncertainty.selective_prediction`). With ``return_curves``, the
    result also has ``curves``: per method, the ``coverage`` and ``accuracy`` lists.
    """
    from .uncertainty import selective_prediction

    with quiet():
        outputs = evaluation_outputs(monteclora, dataset, num_samples, batch_size, seed, tokenizer,
                                     length_normalized=length_normalized)
    labels = outputs["labels"]
    result: dict[str, Any] = {}
    curves = {}
    for name in ("mean", "predictive"):
        curve = selective_prediction(outputs[name]["probs"], labels)
        result[name] = {**calibration_metrics(outputs[name]["probs"], labels, num_bins), "aurc": curve["aurc"]}
        if "prediction_norm" in outputs[name]:
            result[name]["accuracy_norm"] = float((outputs[name]["prediction_norm"] == labels).double().mean())
        curves[name] = {"coverage": curve["coverage"].tolist(), "accuracy": curve["accuracy"].tolist()}
    if return_curves:
        result["curves"] = curves
    return result
