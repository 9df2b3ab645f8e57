"""Multiple-choice rows scored as lm-evaluation-harness scores them, under the posterior.

For a row ``{"question", "choices", "label"}`` the context is ``"Question: {question}\\nAnswer:"``
and each continuation ``" " + choice`` (no EOS), tokenized as lm-eval's ``HFLM`` does
(:func:`~pyro_monteclora.data.tokenize.encode_context_continuation`). Per draw ``s`` of the
adapter, ``L_sk = log p(" " + choice_k | context, A~_s)`` is the summed log-likelihood; then

- ``log_likelihood``: the predictive log-likelihood of each continuation,
  ``log (1/S) sum_s exp(L_sk)`` (what :class:`~pyro_monteclora.prediction.harness.MonteCLoRALM`
  hands lm-eval);
- ``probs``: the probabilities over the row's choices, each draw's ``softmax_k(L_sk)`` averaged
  over draws; ``accuracy``, NLL, Brier, ECE and AURC use these. With ``length_normalized``
  each draw's scores are ``L_sk / len(choice_k)`` (characters) before the softmax;
- ``prediction_norm``: lm-eval's ``acc_norm`` choice, the argmax of ``log_likelihood`` divided
  by the choice's length in characters (the delimiter not counted).

With the mean adapter (``mode="mean"`` or ``num_samples=0``) ``accuracy`` and ``accuracy_norm``
are exactly lm-eval's ``acc`` and ``acc_norm``.

Example:
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import CharTokenizer, tiny_llama
    >>> mc = MonteCLoRA.from_model(tiny_llama(), lora_r=4)
    >>> rows = [{"question": "Is ice cold?", "choices": ["no", "yes"], "label": 1},
    ...         {"question": "Sky?", "choices": ["red", "blue", "green"], "label": 1}]
    >>> scores = score_choices(mc, rows, num_samples=3, tokenizer=CharTokenizer())
    >>> scores["sample_log_likelihood"].shape      # (S, rows, most choices); an absent choice is -inf
    torch.Size([3, 2, 3])
    >>> out = choice_predictive(scores)
    >>> [round(float(p), 6) for p in out["probs"].sum(-1)]
    [1.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from ..data.choices import check_choice_rows, context, continuations
from ..data.tokenize import encode_context_continuation, pad_token_id
from .draws import log_mean_exp, normalize_per_draw, predictive_summary
from .predictive import Predictive, tokenizer_of
from .shared_prompt import absent_choices, cache_argument, pad_groups, ragged_candidate_scores, shared_length
from .shared_prompt import shared_prompt_scores

__all__ = ["score_choices", "choice_predictive", "choice_examples", "network_choice_scores", "choice_lengths"]


def choice_examples(tokenizer: Any, rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """The scored examples of checked rows, row-major (each row's choices in order), lm-eval's tokens."""
    contexts = [context(row) for row in rows for _ in row["choices"]]
    return encode_context_continuation(tokenizer, contexts, [c for row in rows for c in continuations(row)])


def score_choices(
    monteclora: Any,
    rows: Iterable[Any],
    num_samples: int = 8,
    seed: Optional[int] = 0,
    mode: str = "sample",
    tokenizer: Any = None,
    batch_size: int = 16,
    vectorize: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-draw summed log-likelihoods of every row's continuations.

    Returns ``sample_log_likelihood`` ``(S, n, K)`` (``K`` the most choices of a row; a row's
    absent choices are ``-inf``; ``S = 1`` for the mean adapter), ``choice_lengths`` ``(n, K)``
    (characters of each choice, 1 where absent) and ``labels`` ``(n,)``. The context runs once
    per draw and the choices on its KV cache (see :mod:`~pyro_monteclora.prediction.scoring`).
    ``batch_size`` counts scored sequences (row x choice).
    """
    if monteclora.task != "causal_lm":
        raise ValueError(f"multiple-choice rows are scored by a causal LM, got task={monteclora.task!r}")
    rows = check_choice_rows(rows)
    tokenizer = tokenizer_of(monteclora, tokenizer)
    counts = [len(row["choices"]) for row in rows]
    predictive = Predictive(monteclora, num_samples, seed, mode, vectorize=vectorize)
    scores = ragged_candidate_scores(predictive, choice_examples(tokenizer, rows), counts, pad_token_id(tokenizer),
                                     batch_size)
    return {"sample_log_likelihood": scores.cpu().float(), "choice_lengths": choice_lengths(rows),
            "labels": torch.tensor([row["label"] for row in rows])}


def choice_lengths(rows: list[dict[str, Any]]) -> torch.Tensor:
    """``(n, K)``: each choice's length in characters (lm-eval's ``acc_norm`` divisor), 1 where absent."""
    lengths = torch.ones(len(rows), max(len(row["choices"]) for row in rows))
    for i, row in enumerate(rows):
        lengths[i, : len(row["choices"])] = torch.tensor([float(len(c)) for c in row["choices"]])
    return lengths


@torch.no_grad()
def network_choice_scores(
    network: Any, rows: Iterable[Any], tokenizer: Any, repeats: int = 1, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """:func:`score_choices` for any causal LM that is not a MonteCLoRA (a peft LoRA, another method's adapter).

    The rows are scored as lm-eval scores them, on the shared-prompt engine, the batch run
    ``repeats`` times (MC dropout, or a method that draws its own noise in every forward pass: each
    repeat gets its own; a row's context and its choices are two passes). Modes are the caller's.
    Returns ``sample_log_likelihood`` ``(repeats, n, K)`` (``-inf`` where absent), ``choice_lengths``
    and ``labels``, as :func:`score_choices`.
    """
    rows = check_choice_rows(rows)
    counts = [len(row["choices"]) for row in rows]
    padded, k = pad_groups(choice_examples(tokenizer, rows), counts)
    groups = [padded[i : i + k] for i in range(0, len(padded), k)]
    prefixes = [shared_length([e["input_ids"] for e in group]) for group in groups]
    if cache_argument(network) is None:
        raise ValueError("network_choice_scores needs a causal LM that takes a KV cache and position_ids")
    per_batch = max(1, batch_size // k)
    parts = [
        shared_prompt_scores(network, groups[i : i + per_batch], prefixes[i : i + per_batch], pad_token_id(tokenizer),
                             repeats)[0]
        for i in range(0, len(groups), per_batch)
    ]
    scores = torch.cat(parts, dim=1).masked_fill(absent_choices(counts, k, parts[0].device), float("-inf"))
    return {"sample_log_likelihood": scores.cpu().float(), "choice_lengths": choice_lengths(rows),
            "labels": torch.tensor([row["label"] for row in rows])}


def choice_predictive(
    scores: dict[str, torch.Tensor], length_normalized: bool = False, return_samples: bool = False
) -> dict[str, torch.Tensor]:
    """Predictive outputs over the choices from :func:`score_choices`' per-draw scores.

    ``probs``, ``entropy``, ``expected_entropy``, ``mutual_information`` (as
    :class:`~pyro_monteclora.Predictive`), ``log_likelihood`` ``(n, K)`` and
    ``prediction_norm`` ``(n,)``; see the module docstring for which score each uses. Float64.
    """
    # float64 throughout: summed log-likelihoods give probabilities far below float32's range
    per_draw, lengths = scores["sample_log_likelihood"].double(), scores["choice_lengths"].double()
    out = predictive_summary(normalize_per_draw(per_draw / lengths if length_normalized else per_draw), return_samples)
    log_likelihood = log_mean_exp(per_draw)
    out["log_likelihood"] = log_likelihood
    out["prediction_norm"] = (log_likelihood / lengths).argmax(-1)
    return out
