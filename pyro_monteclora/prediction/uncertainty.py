"""What the uncertainty is good for: selective prediction and out-of-distribution detection.

- :func:`selective_prediction`: answer only the most confident share of the examples; the
  accuracy at each coverage, and the area under the risk-coverage curve (AURC, lower is better).
- :func:`detection_metrics`: how well a score separates out-of-distribution inputs (the
  positive class, larger score = more likely OOD) from in-distribution ones: AUROC, AUPR and
  the false-positive rate at 95% true-positive rate (FPR@95).
- :func:`ood_scores`: those metrics for the posterior predictive's maximum probability,
  entropy and mutual information, from a model and two datasets.
- :func:`coverage_plot` and :func:`score_histograms`: the pictures of both.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    >>> labels = torch.tensor([0, 1, 0, 1])                  # the 0.6 answer is the only error
    >>> curve = selective_prediction(probs, labels)
    >>> curve["accuracy"].tolist()                           # coverage 1/4, 2/4, 3/4, 4/4
    [1.0, 1.0, 1.0, 0.75]
    >>> round(curve["aurc"], 4)                              # mean risk: (0 + 0 + 0 + 0.25) / 4
    0.0625
    >>> detection_metrics(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.15]))["auroc"]
    0.75
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from ..calibration import average_ranks, check_probs_labels

__all__ = ["selective_prediction", "detection_metrics", "ood_scores", "coverage_plot", "score_histograms", "SCORES"]

#: The OOD scores: larger means "more likely out of distribution".
SCORES = ("max_probability", "entropy", "mutual_information")


def selective_prediction(
    probs: torch.Tensor, labels: torch.Tensor, confidence: Optional[torch.Tensor] = None
) -> dict[str, Any]:
    """Accuracy when only the ``k`` most confident examples are answered, for ``k = 1..n``.

    Args:
        probs: ``(n, C)`` predicted probabilities.
        labels: ``(n,)`` true classes.
        confidence: ``(n,)`` what to rank by (default: the maximum probability); ties keep the
            examples' order.

    Returns ``coverage`` and ``accuracy`` (``(n,)`` tensors, coverage ``k / n``) and ``aurc``,
    the mean over ``k`` of the risk ``1 - accuracy`` (the area under the risk-coverage curve).
    """
    probs, labels = check_probs_labels(probs, labels)
    confidence = probs.max(-1).values if confidence is None else torch.as_tensor(confidence).double().cpu()
    if confidence.shape != labels.shape:
        raise ValueError(f"confidence must have shape {tuple(labels.shape)}, got {tuple(confidence.shape)}")
    order = torch.sort(-confidence, stable=True).indices
    correct = (probs.argmax(-1) == labels).double()[order]
    answered = torch.arange(1, len(labels) + 1, dtype=torch.float64)
    accuracy = correct.cumsum(0) / answered
    return {"coverage": answered / len(labels), "accuracy": accuracy, "aurc": float((1 - accuracy).mean())}


def detection_metrics(in_scores: torch.Tensor, out_scores: torch.Tensor) -> dict[str, float]:
    """AUROC, AUPR (OOD as the positive class) and FPR@95 of a score that is larger for OOD inputs.

    AUROC is the probability that an OOD input scores above an in-distribution one (ties count
    one half). AUPR is the average precision over the OOD inputs ranked by score. FPR@95 is the
    share of in-distribution inputs that score at least as high as the threshold that flags
    95% of the OOD inputs.
    """
    inside = torch.as_tensor(in_scores).double().flatten().cpu()
    outside = torch.as_tensor(out_scores).double().flatten().cpu()
    if not len(inside) or not len(outside):
        raise ValueError("detection metrics need at least one in-distribution and one OOD score")
    if not (torch.isfinite(inside).all() and torch.isfinite(outside).all()):
        raise ValueError("detection scores must be finite")
    ranks = average_ranks(torch.cat([inside, outside]))
    n_in, n_out = len(inside), len(outside)
    auroc = (float(ranks[n_in:].sum()) - n_out * (n_out - 1) / 2) / (n_in * n_out)  # Mann-Whitney, 0-based ranks
    scores = torch.cat([inside, outside])
    positive = torch.cat([torch.zeros(n_in), torch.ones(n_out)]).double()
    precisions = []
    for value in outside:  # precision at each OOD input's score (ties: every input scoring as high)
        flagged = scores >= value
        precisions.append(float(positive[flagged].sum() / flagged.sum()))
    threshold = torch.sort(outside, descending=True).values[max(0, int(torch.ceil(torch.tensor(0.95 * n_out))) - 1)]
    return {
        "auroc": auroc,
        "aupr": sum(precisions) / n_out,
        "fpr95": float((inside >= threshold).double().mean()),
    }


def _outputs(monteclora: Any, data: Any, num_samples: int, seed: Optional[int], candidates: Optional[Sequence[str]],
             batch_size: int) -> dict[str, torch.Tensor]:
    from ..data.tokenize import format_instruction, load_data
    from .predictive import predict
    from .scoring import multiple_choice

    texts = isinstance(data, (list, tuple)) and all(isinstance(r, str) for r in data)
    rows = list(data) if texts else list(load_data(data))
    if monteclora.task == "classification":
        return predict(monteclora, rows, num_samples=num_samples, seed=seed, batch_size=batch_size)
    if candidates is None:
        raise ValueError("a causal LM scores OOD inputs by their candidates: pass candidates=[...] (the in-distribution answers)")
    prompts = [format_instruction(r) if "instruction" in r else r["prompt"] for r in rows]
    return multiple_choice(monteclora, prompts, list(candidates), num_samples=num_samples, seed=seed,
                           batch_size=batch_size)


def ood_scores(
    monteclora: Any,
    in_data: Any,
    ood_data: Any,
    num_samples: int = 8,
    seed: Optional[int] = 0,
    candidates: Optional[Sequence[str]] = None,
    batch_size: int = 16,
    return_scores: bool = False,
) -> dict[str, Any]:
    """AUROC, AUPR and FPR@95 of the posterior predictive's OOD scores.

    Args:
        monteclora: a trained :class:`~pyro_monteclora.MonteCLoRA` (``num_samples=0``: the mean adapter).
        in_data, ood_data: in-distribution and out-of-distribution inputs: texts or ``text`` rows
            for a classifier; instruction rows (``instruction``/``input``) or ``prompt`` rows
            for a causal LM, which are scored by multiple choice over ``candidates``.
        candidates: for a causal LM, the completions both sets are scored over (those of the
            in-distribution task, such as ``"the correct answer is answer1"`` ... ``answer4``).

    Returns ``{score: {"auroc", "aupr", "fpr95"}}`` for ``max_probability`` (used as
    ``-max p``), ``entropy`` (of the predictive) and ``mutual_information``; with
    ``return_scores``, also ``scores``: ``{score: (in_scores, ood_scores)}``.
    """
    outputs = [_outputs(monteclora, d, num_samples, seed, candidates, batch_size) for d in (in_data, ood_data)]
    values = {
        "max_probability": [-o["probs"].max(-1).values for o in outputs],
        "entropy": [o["entropy"] for o in outputs],
        "mutual_information": [o["mutual_information"] for o in outputs],
    }
    result: dict[str, Any] = {name: detection_metrics(*values[name]) for name in SCORES}
    if return_scores:
        result["scores"] = {name: tuple(v.detach().cpu() for v in values[name]) for name in SCORES}
    return result


def coverage_plot(curves: dict[str, dict[str, Any]], path: str, title: str = "Selective prediction") -> str:
    """Accuracy against coverage, one line per method (``{label: selective_prediction(...)}``); a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4))
    for label, curve in curves.items():
        axis.plot(curve["coverage"].numpy(), curve["accuracy"].numpy(), label=f"{label} (AURC {curve['aurc']:.3f})")
    axis.set_xlabel("coverage (share of examples answered)")
    axis.set_ylabel("accuracy on the answered examples")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def score_histograms(scores: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str, bins: int = 30) -> str:
    """Histograms of each OOD score on in- and out-of-distribution inputs (``ood_scores(..., return_scores=True)``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2))
    for axis, (name, (inside, outside)) in zip(axes if len(scores) > 1 else [axes], scores.items()):
        axis.hist(inside.numpy(), bins=bins, alpha=0.6, density=True, label="in distribution")
        axis.hist(outside.numpy(), bins=bins, alpha=0.6, density=True, label="out of distribution")
        axis.set_title(name.replace("_", " ") + (" (negated)" if name == "max_probability" else ""))
        axis.legend(fontsize=7)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
