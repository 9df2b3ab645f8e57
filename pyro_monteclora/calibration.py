"""Calibration metrics of probabilistic classifiers: accuracy, NLL, Brier score, ECE, diagrams.

Every function takes ``probs``, an ``(n, C)`` tensor of predicted class probabilities (rows sum
to 1), and ``labels``, an ``(n,)`` long tensor of true classes, and returns a Python float.

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> labels = torch.tensor([0, 1, 1])
    >>> accuracy(probs, labels)
    0.6666666666666666
    >>> round(brier_score(probs, labels), 4)    # ((0.1²·2) + (0.2²·2) + (0.6²·2)) / 3
    0.2733
    >>> sorted(calibration_metrics(probs, labels))
    ['accuracy', 'brier', 'ece', 'nll']
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

__all__ = [
    "check_probs_labels",
    "average_ranks",
    "accuracy",
    "negative_log_likelihood",
    "brier_score",
    "expected_calibration_error",
    "calibration_bins",
    "reliability_diagram",
    "calibration_metrics",
    "rank_correlation",
    "fit_temperature",
    "temperature_scale",
]


def check_probs_labels(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` ``(n, C)`` and integer ``labels`` ``(n,)`` as tensors, checked; a clear error otherwise."""
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels)
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (n, classes), got {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},) to match probs, got {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("calibration metrics need at least one example")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if bool((labels < 0).any()) or bool((labels >= probs.shape[1]).any()):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got values {labels.unique().tolist()}")
    return probs.detach().double().cpu(), labels.detach().long().cpu()


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of examples whose most probable class is the label."""
    probs, labels = check_probs_labels(probs, labels)
    return float((probs.argmax(-1) == labels).double().mean())


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over examples of ``-log probs[i, labels[i]]`` (nats); ``inf`` if a label has probability 0."""
    probs, labels = check_probs_labels(probs, labels)
    return float(-probs.gather(1, labels[:, None]).log().mean())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over examples of ``sum_c (probs[i, c] - [labels[i] = c])**2``.

    The sum runs over all C classes (Brier's original definition), so the score lies in
    ``[0, 2]``; for two classes it is twice the "binary" Brier score ``(p_1 - y)**2``.
    """
    probs, labels = check_probs_labels(probs, labels)
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float((probs - one_hot).pow(2).sum(-1).mean())


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict[str, torch.Tensor]:
    """Equal-width bins on the confidence ``max_c probs[i, c]``.

    Bin ``b`` holds confidences in ``(b / B, (b + 1) / B]`` (a confidence of exactly 0 goes to the
    first bin); edges are compared in float64, so a float32 confidence that prints as an edge
    may fall on either side of it. Returns ``count``, ``accuracy`` and ``confidence`` per bin (``(B,)`` tensors; the
    mean accuracy and confidence of an empty bin are 0) and the bin ``edges`` ``(B + 1,)``.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    probs, labels = check_probs_labels(probs, labels)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    edges = torch.arange(num_bins + 1, dtype=torch.float64) / num_bins
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(confidence))
    hits = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, correct)
    confidences = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, confidence)
    safe = count.clamp_min(1.0)
    return {
        "count": count,
        "accuracy": hits / safe,
        "confidence": confidences / safe,
        "edges": edges,
    }


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """ECE: ``sum_b (n_b / n) |accuracy_b - confidence_b|`` over equal-width confidence bins.

    Confidence is the maximum predicted probability; see :func:`calibration_bins` for the bins.
    """
    bins = calibration_bins(probs, labels, num_bins)
    weights = bins["count"] / bins["count"].sum()
    return float((weights * (bins["accuracy"] - bins["confidence"]).abs()).sum())


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict[str, float]:
    """``{"accuracy", "nll", "brier", "ece"}`` of one set of predictions."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        "ece": expected_calibration_error(probs, labels, num_bins),
    }


def temperature_scale(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log(probs) / T)``: the probabilities with temperature ``T`` (``T > 1`` flattens them).

    Example:
        >>> temperature_scale(torch.tensor([[0.8, 0.2]]), 2.0)   # sqrt(0.8) : sqrt(0.2)
        tensor([[0.6667, 0.3333]])
    """
    if not temperature > 0 or not torch.isfinite(torch.tensor(float(temperature))):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    log_probs = torch.log(torch.as_tensor(probs, dtype=torch.float64))
    return torch.softmax(log_probs / temperature, dim=-1).to(torch.as_tensor(probs).dtype)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor, low: float = 0.01, high: float = 100.0) -> float:
    """The temperature minimizing the NLL of :func:`temperature_scale` on held-out ``probs``, ``labels``.

    Temperature scaling (Guo et al., 2017): one number fitted on a validation split, which keeps
    every prediction's ranking (and so the accuracy) and changes only its confidence. Searched on
    a grid of 201 values of ``log T`` in ``[low, high]``, then refined around the best; the NLL is
    convex in ``1/T``, so the grid cannot miss the minimum by more than its spacing.

    Example:
        >>> probs = torch.tensor([[0.99, 0.01], [0.99, 0.01], [0.99, 0.01], [0.01, 0.99]])
        >>> fit_temperature(probs, torch.tensor([0, 1, 0, 1])) > 1          # over-confident: T > 1
        True
    """
    probs, labels = check_probs_labels(probs, labels)
    log_probs = torch.log(probs.double())

    def nll(t: float) -> float:
        return float(torch.nn.functional.cross_entropy(log_probs / t, labels))

    grid = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), 201, dtype=torch.float64)
    best = min(grid.tolist(), key=nll)
    step = (torch.log(grid[1]) - torch.log(grid[0])).item()
    fine = torch.exp(torch.linspace(math.log(best) - step, math.log(best) + step, 41, dtype=torch.float64))
    return float(min(fine.tolist(), key=nll))


def reliability_diagram(
    probs: torch.Tensor,
    labels: torch.Tensor,
    path: str | os.PathLike,
    num_bins: int = 15,
    title: Optional[str] = None,
) -> str:
    """Write one PNG: the reliability diagram (accuracy per confidence bin) above a histogram of
    the confidences. Returns the path written. Uses matplotlib's non-interactive Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    bins = calibration_bins(probs, labels, num_bins)
    ece = expected_calibration_error(probs, labels, num_bins)
    acc = accuracy(probs, labels)
    edges = bins["edges"].numpy()
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    filled = (bins["count"] > 0).numpy()

    figure = Figure(figsize=(4.2, 5.0), dpi=100)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[filled], bins["accuracy"].numpy()[filled], width=width, edgecolor="black",
            color="tab:blue", label="accuracy")
    gap_low = bins["accuracy"].numpy()[filled]
    gap = bins["confidence"].numpy()[filled] - gap_low
    top.bar(centers[filled], gap, bottom=gap_low, width=width, edgecolor="tab:red", color="tab:red",
            alpha=0.3, hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8, title=f"ECE = {ece:.3f}, accuracy = {acc:.3f}", title_fontsize=8)
    top.set_title(title or "Reliability diagram", fontsize=9)
    bottom.bar(centers, bins["count"].numpy(), width=width, edgecolor="black", color="tab:gray")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("count")
    figure.tight_layout()
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of ``values``, ties sharing the average of their ranks."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return (starts.double() + (counts.double() - 1) / 2)[inverse]


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho of two 1-d samples: the Pearson correlation of their (average) ranks.

    How well an uncertainty score orders examples like a ground truth does (e.g. predictive
    entropy against the spread of human ratings). Raises ``ValueError`` when either sample is
    constant, where the correlation is undefined.

    Example:
        >>> round(rank_correlation(torch.tensor([0.1, 0.4, 0.3]), torch.tensor([1.0, 3.0, 2.0])), 6)
        1.0
    """
    x, y = torch.as_tensor(x).reshape(-1), torch.as_tensor(y).reshape(-1)
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"need two samples of equal size >= 2, got {x.numel()} and {y.numel()}")
    a, b = average_ranks(x), average_ranks(y)
    a, b = a - a.mean(), b - b.mean()
    norm = a.norm() * b.norm()
    if norm == 0:
        raise ValueError("rank correlation is undefined for a constant sample")
    return float((a * b).sum() / norm)
