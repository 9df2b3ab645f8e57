"""The shared-prompt engine: K continuations of one context scored on one pass of the context.

Candidates usually share most of their tokens (a question and its answers): the network runs
once on the context and the part the candidates share (with a KV cache, per draw), then only on
each candidate's remaining tokens, and computes the LM head only where a scored token is
predicted. The scores equal those of one full forward pass per candidate (tested); K-way scoring
costs about one pass of the context. Groups are batched longest first (as lm-eval sorts its
requests), so a batch wastes little on padding; results come back in the caller's order.

Used by :mod:`.scoring` (``multiple_choice``), :mod:`.choices` (lm-eval-style rows) and the
lm-eval model (:mod:`.harness`).

Example:
    >>> import torch
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.data.tokenize import encode_context_continuation
    >>> from pyro_monteclora.prediction.predictive import Predictive
    >>> from pyro_monteclora.testing import CharTokenizer, tiny_llama
    >>> mc = MonteCLoRA.from_model(tiny_llama(), lora_r=4)
    >>> examples = encode_context_continuation(CharTokenizer(), ["Sky?", "Sky?", "Sky?", "Ice?"],
    ...                                        [" red", " blue", " grey", " cold"])
    >>> scores = ragged_candidate_scores(Predictive(mc, num_samples=2, seed=0), examples, [3, 1], 0, 8)
    >>> scores.shape, bool(torch.isneginf(scores[:, 1, 1:]).all())     # row 2 has one candidate
    (torch.Size([2, 2, 3]), True)
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch

from ..data.tokenize import batches
from ..layers import noise_context
from ..models.choices import cache_argument, choice_batch, choice_log_likelihoods, shared_length
from .draws import eval_mode
from .predictive import Predictive

__all__ = [
    "ragged_candidate_scores",
    "candidate_scores",
    "network_candidate_scores",
    "shared_prompt_scores",
    "sample_scores",
    "pad_groups",
    "absent_choices",
    "cache_argument",
    "shared_length",
]


def sample_scores(predictive: Predictive, examples: list[dict], pad_id: int, batch_size: int) -> torch.Tensor:
    """Per-draw sequence log-likelihoods ``(S, n)`` by full forward passes (no cache), batch by batch."""
    parts = [predictive.sample_sequence_log_likelihood(b) for b in batches(examples, pad_id, batch_size)]
    return torch.cat(parts, dim=1)


def ragged_candidate_scores(
    predictive: Predictive, examples: list[dict], counts: Sequence[int], pad_id: int, batch_size: int,
    share_prompt: bool = True, return_greedy: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Per-draw sequence log-likelihoods ``(S, n, K_max)`` of prompts with ``counts[i]`` candidates each.

    ``examples`` are prompt-major (the candidates of prompt 0, then of prompt 1, ...). A prompt
    with fewer than ``K_max`` candidates is padded by repeating its last one, whose extra scores
    are set to ``-inf``: probability 0 after :func:`~pyro_monteclora.prediction.draws.normalize_per_draw`.
    With ``return_greedy`` also the greedy flags ``(S, n, K_max)`` (``False`` where absent).
    """
    padded, k = pad_groups(examples, counts)
    out = candidate_scores(predictive, padded, k, pad_id, batch_size, share_prompt, return_greedy)
    scores, greedy = out if return_greedy else (out, None)
    absent = absent_choices(counts, k, scores.device)
    scores = scores.masked_fill(absent, float("-inf"))
    return (scores, greedy & ~absent) if return_greedy else scores


def pad_groups(examples: list[dict], counts: Sequence[int]) -> tuple[list[dict], int]:
    """Prompt-major examples with ``counts[i]`` candidates each, padded to ``K = max(counts)`` per prompt
    by repeating the prompt's last candidate; returns the padded list and ``K``."""
    if not counts or min(counts) < 1:
        raise ValueError(f"every prompt needs at least one candidate, got counts {sorted(set(counts))}")
    if len(examples) != sum(counts):
        raise ValueError(f"got {len(examples)} examples for {sum(counts)} candidates")
    k = max(counts)
    padded, start = [], 0
    for count in counts:
        group = examples[start : start + count]
        padded.extend(group + [group[-1]] * (k - count))
        start += count
    return padded, k


def absent_choices(counts: Sequence[int], k: int, device: Any = None) -> torch.Tensor:
    """``(n, K)``: True where prompt ``i`` has no candidate ``j`` (``j >= counts[i]``)."""
    return torch.arange(k, device=device)[None, :] >= torch.tensor(list(counts), device=device)[:, None]


def candidate_scores(
    predictive: Predictive, examples: list[dict], k: int, pad_id: int, batch_size: int, share_prompt: bool = True,
    return_greedy: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Per-draw sequence log-likelihoods ``(S, n, K)`` of ``n * K`` scored examples (prompt-major).

    With ``return_greedy`` also the greedy flags ``(S, n, K)`` (the shared-prompt path only).
    """
    network = predictive.monteclora.network
    groups = [examples[i : i + k] for i in range(0, len(examples), k)]
    prefixes = [shared_length([e["input_ids"] for e in group]) for group in groups]
    if not share_prompt or cache_argument(network) is None or min(prefixes) < 1:
        if return_greedy:
            raise ValueError("greedy flags need the shared-prompt path: a causal LM that takes a KV cache and "
                             "position_ids, and share_prompt=True")
        scores = sample_scores(predictive, examples, pad_id, batch_size)
        return scores.reshape(scores.shape[0], len(groups), k)
    order = sorted(range(len(groups)), key=lambda i: -max(len(e["input_ids"]) for e in groups[i]))
    per_batch = max(1, batch_size // k)
    scores, flags = [], []
    with eval_mode(predictive.monteclora), torch.no_grad():
        for start in range(0, len(order), per_batch):
            chosen = order[start : start + per_batch]
            chunk, lengths = [groups[i] for i in chosen], [prefixes[i] for i in chosen]
            noise = predictive.draw_noise()  # one set of S adapters for the prompt and the candidates
            if noise is None:
                part = shared_prompt_scores(network, chunk, lengths, pad_id, 1)
            elif predictive.vectorize:
                with noise_context(predictive.monteclora.groups, noise):
                    part = shared_prompt_scores(network, chunk, lengths, pad_id, predictive.num_samples)
            else:
                draws = []
                for s in range(predictive.num_samples):
                    with noise_context(predictive.monteclora.groups, {g: v[s] for g, v in noise.items()}):
                        draws.append(shared_prompt_scores(network, chunk, lengths, pad_id, 1))
                part = (torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws]))
            scores.append(part[0])
            flags.append(part[1])
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = inverse.to(scores[0].device)
    out = torch.cat(scores, dim=1).index_select(1, inverse)
    return (out, torch.cat(flags, dim=1).index_select(1, inverse)) if return_greedy else out


@torch.no_grad()
def network_candidate_scores(
    network: Any, examples: list[dict], k: int, pad_id: int, batch_size: int = 16, repeats: int = 1
) -> torch.Tensor:
    """Sequence log-likelihoods ``(repeats, n, K)`` of scored examples under any causal LM.

    For networks that are not a :class:`~pyro_monteclora.MonteCLoRA` (a plain peft LoRA model,
    another method's adapter): the same shared-prompt computation as :func:`candidate_scores`,
    the batch run ``repeats`` times (for MC dropout: the caller puts dropout in training mode,
    and every repeat gets its own masks; the K candidates of a prompt share the prompt's mask).
    Modes are the caller's.
    """
    groups = [examples[i : i + k] for i in range(0, len(examples), k)]
    prefixes = [shared_length([e["input_ids"] for e in group]) for group in groups]
    if cache_argument(network) is None or min(prefixes) < 1:
        raise ValueError("network_candidate_scores needs a causal LM that takes a KV cache and position_ids")
    per_batch = max(1, batch_size // k)
    parts = [
        shared_prompt_scores(network, groups[i : i + per_batch], prefixes[i : i + per_batch], pad_id, repeats)[0]
        for i in range(0, len(groups), per_batch)
    ]
    return torch.cat(parts, dim=1)


def shared_prompt_scores(
    network: Any, groups: list[list[dict]], prefixes: list[int], pad_id: int, draws: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and greedy flags ``(draws, prompts, K)``: the shared prefix (left-padded, cached), then each rest.

    The rows are repeated ``draws`` times (sample-major): an open noise context holds ``draws``
    adapters, or one (``draws = 1``). ``greedy[s, i, j]``: under draw ``s`` every scored token of
    candidate ``j`` is the argmax of its position's distribution (lm-eval's ``is_greedy``). The
    computation is the multiple-choice likelihood's (:mod:`pyro_monteclora.models.choices`).
    """
    return choice_log_likelihoods(network, choice_batch(groups, prefixes, pad_id), draws, share_prompt=True)
