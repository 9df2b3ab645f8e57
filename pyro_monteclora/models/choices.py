"""The multiple-choice likelihood and the engine that scores a prompt's choices in one pass of it.

A row has a context ``c``, choices ``x_1 .. x_K`` and a label. Under the adapter ``A~`` drawn for
the step, each choice's score is its continuation's log-likelihood, as lm-evaluation-harness
scores it::

    L_k = log p(x_k | c, A~)            summed over the continuation's tokens   (choice_score="sum")
    L_k = log p(x_k | c, A~) / chars_k  per character of the choice             (choice_score="per_char")
    label ~ Categorical(softmax_k L_k)  under the data plate (scaled to the dataset): the classification
                                        likelihood over the choices (:mod:`.likelihood`)

The tensors of a batch (:func:`choice_batch`) hold a *prompt* part per row (the context and the
tokens all its choices share, left-padded) and a *choice* part per choice (its own tokens,
right-padded). :func:`choice_log_likelihoods` runs the network once on the prompts, keeps their
KV cache and runs every choice on it: the context costs one pass per draw, not one per choice,
and gradients flow through the cache. Where the cache is unavailable (activation checkpointing in
training, which transformers runs without a cache, or a model that takes none), the same scores
come from one pass per choice over ``prompt + choice`` with the same positions and mask (tested
equal in value and gradient).

Example:
    >>> import torch
    >>> from pyro_monteclora.testing import tiny_llama
    >>> network = tiny_llama()
    >>> groups = [[{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]},
    ...            {"input_ids": [1, 5, 9], "labels": [-100, -100, 9]}]]
    >>> batch = choice_batch(groups, [shared_length([e["input_ids"] for e in groups[0]])], pad_id=0)
    >>> scores = choice_log_likelihoods(network, batch)[0]
    >>> scores.shape                                  # (draws, rows, choices)
    torch.Size([1, 1, 2])
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

import torch

from .likelihood import IGNORE_INDEX, target_positions

__all__ = [
    "CHOICE_KEYS",
    "is_choice_batch",
    "choice_batch",
    "choice_log_likelihoods",
    "choice_logits",
    "cache_argument",
    "shared_length",
    "supports_logits_to_keep",
]

#: The tensors of a multiple-choice batch besides ``labels`` and ``index``.
CHOICE_KEYS = ("prompt_ids", "prompt_mask", "prompt_labels", "choice_ids", "choice_mask", "choice_labels",
               "choice_present", "choice_lengths")


def is_choice_batch(batch: Mapping[str, Any]) -> bool:
    """Whether ``batch`` is a multiple-choice batch (from :func:`choice_batch`)."""
    return "choice_ids" in batch


def supports_logits_to_keep(network: Any) -> bool:
    """Whether a (peft-wrapped) transformers LM computes logits only at given per-row positions.

    transformers' ``slice_logits_to_keep`` (5.x) takes a ``(batch, K)`` tensor of positions; a
    model whose ``forward`` has ``logits_to_keep`` and a transformers that has the function
    qualify. Older versions slice a 2D tensor differently, so they get full logits.
    """
    import transformers.modeling_utils as modeling_utils

    base = network.get_base_model() if hasattr(network, "get_base_model") else network
    return hasattr(modeling_utils, "slice_logits_to_keep") and "logits_to_keep" in inspect.signature(base.forward).parameters


def cache_argument(network: Any) -> Optional[str]:
    """The name under which the LM's ``forward`` takes a KV cache (transformers 5.2x: ``cache``,
    before: ``past_key_values``), or ``None`` if it takes none (or no ``position_ids``)."""
    base = network.get_base_model() if hasattr(network, "get_base_model") else network
    parameters = inspect.signature(base.forward).parameters
    if "position_ids" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def shared_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens all sequences share at their start, keeping at least one own token in each."""
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def choice_batch(groups: Sequence[Sequence[Mapping[str, Sequence[int]]]], prefixes: Sequence[int],
                 pad_id: int) -> dict[str, torch.Tensor]:
    """The tensors of ``len(groups)`` rows of ``K`` scored examples each (``input_ids``, ``labels``).

    ``prefixes[i]`` tokens are shared by row ``i``'s examples (:func:`shared_length`); they form
    the left-padded prompt, the rest each choice's right-padded part. Labels are
    ``IGNORE_INDEX`` wherever a token is not scored (the context, padding). Adds
    ``choice_present`` (all true; the caller marks padded choices) but neither ``labels`` nor
    ``choice_lengths``.
    """
    b, k, width = len(groups), len(groups[0]), max(prefixes)
    if any(len(group) != k for group in groups):
        raise ValueError(f"every row needs the same number of choices here, got {sorted({len(g) for g in groups})}")
    rest_width = max(len(e["input_ids"]) - length for group, length in zip(groups, prefixes) for e in group)
    prompt_ids = torch.full((b, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(b, width, dtype=torch.long)
    prompt_labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    choice_ids = torch.full((b, k, rest_width), pad_id, dtype=torch.long)
    choice_mask = torch.zeros(b, k, rest_width, dtype=torch.long)
    choice_labels = torch.full((b, k, rest_width), IGNORE_INDEX, dtype=torch.long)
    for i, (group, length) in enumerate(zip(groups, prefixes)):
        offset = width - length
        prompt_ids[i, offset:] = torch.tensor(group[0]["input_ids"][:length])
        prompt_mask[i, offset:] = 1
        prompt_labels[i, offset:] = torch.tensor(group[0]["labels"][:length])
        for j, example in enumerate(group):
            rest = example["input_ids"][length:]
            choice_ids[i, j, : len(rest)] = torch.tensor(rest)
            choice_mask[i, j, : len(rest)] = 1
            choice_labels[i, j, : len(rest)] = torch.tensor(example["labels"][length:])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "prompt_labels": prompt_labels,
            "choice_ids": choice_ids, "choice_mask": choice_mask, "choice_labels": choice_labels,
            "choice_present": torch.ones(b, k, dtype=torch.bool)}


def _repeat(tensor: torch.Tensor, times: int) -> torch.Tensor:
    return tensor.repeat(times, *([1] * (tensor.dim() - 1))) if times > 1 else tensor


def _uses_cache(network: Any) -> bool:
    """Whether the prompt's KV cache can carry the choices (not under activation checkpointing in training)."""
    if cache_argument(network) is None:
        return False
    if not (network.training and torch.is_grad_enabled()):
        return True
    # transformers runs a checkpointed block without its cache in training (modeling_layers.py)
    return not any(getattr(m, "gradient_checkpointing", False) is True for m in network.modules())


def _scored(log_probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of ``targets`` where ``valid`` (last dim), and whether each is the argmax."""
    picked = log_probs.gather(-1, targets[..., None]).squeeze(-1)
    greedy = ((log_probs.argmax(-1) == targets) | ~valid).all(-1)
    return (picked * valid).sum(-1), greedy


def choice_log_likelihoods(network: Any, batch: Mapping[str, torch.Tensor], draws: int = 1,
                           share_prompt: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each choice's summed log-likelihood and greedy flag, ``(draws, rows, K)`` each.

    The network's rows are the batch repeated ``draws`` times, sample-major (an open noise
    context holds ``draws`` adapters, or one). ``greedy[s, i, j]``: under draw ``s`` every scored
    token of choice ``j`` is the argmax of its position's distribution (lm-eval's ``is_greedy``).
    ``share_prompt=None`` runs the choices on the prompt's KV cache where the network allows it
    (one pass per choice otherwise); ``False`` forces one pass per choice. Graphs are kept:
    wrap in ``torch.no_grad()`` to score without them. Absent choices are not masked here.
    """
    device = next(network.parameters()).device
    batch = {key: batch[key].to(device) for key in CHOICE_KEYS[:6]}
    if share_prompt is None:
        share_prompt = _uses_cache(network)
    if share_prompt and cache_argument(network) is None:
        raise ValueError("sharing the prompt needs a causal LM that takes a KV cache and position_ids")
    run = _shared_prompt if share_prompt else _one_pass_per_choice
    return run(network, batch, draws)


def _logits_at(network: Any, inputs: dict[str, torch.Tensor], positions: torch.Tensor, **extra: Any) -> tuple:
    """The network's output and its logits at ``positions`` ``(rows, m)`` (computed there only where supported)."""
    if supports_logits_to_keep(network):
        out = network(**inputs, logits_to_keep=positions, **extra)
        return out, out.logits
    out = network(**inputs, **extra)
    return out, out.logits.gather(1, positions[..., None].expand(-1, -1, out.logits.shape[-1]))


def _shared_prompt(network: Any, batch: dict[str, torch.Tensor], draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompt_mask, prompt_labels = batch["prompt_mask"], batch["prompt_labels"]
    b, width = prompt_mask.shape
    k, rest_width = batch["choice_ids"].shape[1:]
    # the prompt's own scored tokens (tokens all choices share), then the last position (each choice's start)
    where, valid = target_positions(prompt_labels)
    targets = prompt_labels.gather(1, where + 1).clamp_min(0)
    last = torch.full((b, 1), width - 1, dtype=torch.long, device=where.device)
    positions = torch.cat([where, last], dim=1)
    inputs = {"input_ids": batch["prompt_ids"], "attention_mask": prompt_mask,
              "position_ids": (prompt_mask.cumsum(1) - 1).clamp_min(0)}
    inputs = {key: _repeat(value, draws) for key, value in inputs.items()}
    out, logits = _logits_at(network, inputs, _repeat(positions, draws), use_cache=True)
    log_probs = torch.log_softmax(logits.float(), dim=-1).reshape(draws, b, positions.shape[1], -1)
    shared, shared_greedy = _scored(log_probs[:, :, :-1], targets.expand(draws, b, -1), valid.expand(draws, b, -1))
    first = log_probs[:, :, -1]  # (draws, b, V): predicts each choice's first own token

    choice_ids, choice_mask, choice_labels = batch["choice_ids"], batch["choice_mask"], batch["choice_labels"]
    scored = choice_labels != IGNORE_INDEX
    first_scores, first_greedy = _scored(first[:, :, None, None, :].expand(draws, b, k, 1, first.shape[-1]),
                                         choice_ids[None, :, :, :1].expand(draws, b, k, 1),
                                         scored[None, :, :, :1].expand(draws, b, k, 1))
    scores = shared[..., None] + first_scores
    greedy = shared_greedy[..., None] & first_greedy
    if rest_width == 1:  # each choice's own part is one token, scored from the prompt's pass
        return scores, greedy
    argument = cache_argument(network)
    cache = out[argument]
    cache.batch_repeat_interleave(k)  # rows (draw, prompt) -> (draw, prompt, choice)
    start = prompt_mask.sum(1)[:, None, None] + torch.arange(rest_width, device=prompt_mask.device)
    rest_inputs = {  # the last token is input too (its logits go unused): no choice has an empty input
        "input_ids": _repeat(choice_ids.reshape(b * k, rest_width), draws),
        "attention_mask": torch.cat([inputs["attention_mask"].repeat_interleave(k, dim=0),
                                     _repeat(choice_mask.reshape(b * k, rest_width), draws)], dim=1),
        "position_ids": _repeat(start.expand(b, k, rest_width).reshape(b * k, rest_width), draws),
    }
    # the LM head only where a choice's next token is scored (not on padding: choices differ in length)
    rest_labels = choice_labels.reshape(b * k, rest_width)
    where, valid = target_positions(rest_labels)
    targets = rest_labels.gather(1, where + 1).clamp_min(0)
    rest_logits = _logits_at(network, rest_inputs, _repeat(where, draws), **{argument: cache}, use_cache=True)[1]
    m = where.shape[1]
    rest_log_probs = torch.log_softmax(rest_logits.float(), dim=-1).reshape(draws, b, k, m, -1)
    rest_scores, rest_greedy = _scored(rest_log_probs, targets.reshape(b, k, m).expand(draws, b, k, m),
                                       valid.reshape(b, k, m).expand(draws, b, k, m))
    return scores + rest_scores, greedy & rest_greedy


def _one_pass_per_choice(network: Any, batch: dict[str, torch.Tensor], draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scores from ``prompt + choice`` rows: the prompt's positions and mask, no cache."""
    prompt_mask = batch["prompt_mask"]
    b, width = prompt_mask.shape
    k, rest_width = batch["choice_ids"].shape[1:]

    def rows(prompt: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        return torch.cat([prompt.repeat_interleave(k, dim=0), choice.reshape(b * k, rest_width)], dim=1)

    start = prompt_mask.sum(1)[:, None, None] + torch.arange(rest_width, device=prompt_mask.device)
    prompt_positions = (prompt_mask.cumsum(1) - 1).clamp_min(0)
    inputs = {
        "input_ids": rows(batch["prompt_ids"], batch["choice_ids"]),
        "attention_mask": rows(prompt_mask, batch["choice_mask"]),
        "position_ids": rows(prompt_positions, start.expand(b, k, rest_width)),
    }
    labels = rows(batch["prompt_labels"], batch["choice_labels"])
    where, valid = target_positions(labels)
    targets = labels.gather(1, where + 1).clamp_min(0)
    inputs = {key: _repeat(value, draws) for key, value in inputs.items()}
    logits = _logits_at(network, inputs, _repeat(where, draws))[1]
    log_probs = torch.log_softmax(logits.float(), dim=-1).reshape(draws, b, k, where.shape[1], -1)
    m = where.shape[1]
    return _scored(log_probs, targets.reshape(b, k, m).expand(draws, b, k, m), valid.reshape(b, k, m).expand(draws, b, k, m))


def choice_logits(scores: torch.Tensor, batch: Mapping[str, torch.Tensor], choice_score: str = "sum") -> torch.Tensor:
    """The Categorical's logits from summed scores ``(..., rows, K)``: divided by the choices' characters
    for ``"per_char"``, ``-inf`` on absent choices."""
    if choice_score not in ("sum", "per_char"):
        raise ValueError(f"choice_score must be 'sum' or 'per_char', got {choice_score!r}")
    present = batch["choice_present"].to(scores.device)
    if choice_score == "per_char":
        scores = scores / batch["choice_lengths"].to(scores.device, scores.dtype)
    return scores.masked_fill(~present, float("-inf"))
