"""Draws of the adapter and how their predictions combine: the one home of that arithmetic.

Predictive probabilities average the per-draw *probabilities* (a log-mean-exp of per-draw
log-probabilities), never the logits. For scores of sequences, ``log p(c | x) = log (1/S)
sum_s p(c | x, A~_s)``; for a choice among K answers, each draw's scores are first normalized
over the answers (:func:`normalize_per_draw`), then the draws are averaged. :mod:`.predictive`,
:mod:`.scoring` and the lm-eval model (:mod:`pyro_monteclora.prediction.lm_eval`) all combine
draws through these functions.

Example:
    >>> import torch
    >>> per_draw = torch.log(torch.tensor([[0.2], [0.6]]))     # two draws, one sequence
    >>> round(float(log_mean_exp(per_draw).exp()), 6)
    0.4
    >>> scores = torch.tensor([[[0.0, 0.0, float("-inf")]]])   # a row with 2 of 3 choices (float32)
    >>> normalize_per_draw(scores).exp().tolist()
    [[[0.5, 0.5, 0.0]]]
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Optional

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from ..models.prior import site_names

__all__ = [
    "log_mean_exp",
    "normalize_per_draw",
    "predictive_summary",
    "draw_latents",
    "seeded",
    "eval_mode",
    "repeat_rows",
]


def log_mean_exp(per_draw: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``log (1/S) sum_s exp(per_draw[s])`` over ``dim``, computed in float64 (a stable logsumexp).

    ``-inf`` entries (impossible under every draw) stay ``-inf``. Returns float64.
    """
    values = per_draw.double()
    return torch.logsumexp(values, dim) - math.log(values.shape[dim])


def normalize_per_draw(scores: torch.Tensor) -> torch.Tensor:
    """Each draw's log-distribution over the last dimension: ``log_softmax(scores, -1)``.

    ``scores`` ``(S, n, K)`` are per-draw log-likelihoods of K answers; an answer a row does not
    have is ``-inf`` and gets probability 0. A row whose answers are all ``-inf`` is refused.
    Computed in float64, returned in float32 (float64 for float64 input).
    """
    if bool(torch.isneginf(scores).all(-1).any()):
        raise ValueError("a row has no answer with a finite score: every choice is absent or impossible")
    return torch.log_softmax(scores.double(), dim=-1).to(torch.promote_types(scores.dtype, torch.float32))


def predictive_summary(sample_log_probs: torch.Tensor, return_samples: bool = False) -> dict[str, torch.Tensor]:
    """Predictive probabilities and the entropy split from per-draw log-probabilities ``(S, ..., C)``.

    ``probs`` is the mean of the per-draw probabilities (:func:`log_mean_exp`);
    ``entropy`` H[p], ``expected_entropy`` the mean per-draw entropy and
    ``mutual_information = entropy - expected_entropy`` (clamped at 0 against rounding).
    Computed in float64, returned in float32 (float64 for float64 input).
    """
    out_dtype = torch.promote_types(sample_log_probs.dtype, torch.float32)
    draws = sample_log_probs.shape[0]
    probs = log_mean_exp(sample_log_probs).exp()
    sample_probs = sample_log_probs.double().exp()
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    expected = -torch.special.xlogy(sample_probs, sample_probs).sum(-1).mean(0)
    information = (entropy - expected).clamp_min(0.0) if draws > 1 else torch.zeros_like(entropy)
    out = {
        "probs": probs.to(out_dtype),
        "entropy": entropy.to(out_dtype),
        "expected_entropy": expected.to(out_dtype),
        "mutual_information": information.to(out_dtype),
    }
    if return_samples:
        out["sample_probs"] = sample_probs.to(out_dtype)
    return out


def draw_latents(monteclora: Any, num_samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``num_samples`` draws of every group's latents from the guide in one vectorized call.

    The guide runs under ``pyro.plate("samples", S, dim=-2)`` (its own layer plates use dim -1),
    so each site gets a leading ``S`` dimension. Returns ``{group: (covariance_tril (S, layers,
    r, r), weights (S, layers, N), components (S, layers, N, d, r))}``, the input of
    ``monteclora.model.noise``. Hidden from any outer Pyro handler (``poutine.block``).
    """
    with torch.no_grad(), poutine.block(), pyro.plate("samples", num_samples, dim=-2):
        trace = poutine.trace(monteclora.guide).get_trace(None)
    latents = {}
    for group in monteclora.groups:
        names = site_names(group)
        latents[group.name] = tuple(
            trace.nodes[names[key]]["value"] for key in ("covariance", "weights", "components")
        )
    return latents


@contextlib.contextmanager
def seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Run the block with ``torch.manual_seed(seed)`` and restore the caller's RNG state after.

    With ``seed=None`` the block draws from (and advances) the global RNG, like ``pyro.infer.Predictive``.
    """
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout) for the block; each one's own flag restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def repeat_rows(inputs: Mapping[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """The batch repeated ``times`` times along dim 0, sample-major (``[batch, batch, ...]``)."""
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
