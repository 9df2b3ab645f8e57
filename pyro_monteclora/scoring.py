"""Causal-LM scoring under the posterior predictive: completions and multiple-choice candidates.

- :func:`sequence_log_likelihood`: ``log p(c | x) = log (1/S) sum_s p(c | x, A~_s)`` for given
  prompts and completions;
- :func:`multiple_choice`: per draw, the candidates' sequence log-likelihoods normalized over
  the K candidates; the predictive averages these per-draw distributions;
- :func:`instruction_choices`: the candidates of a commonsense instruction row.

Candidates usually share most of their tokens (``"the correct answer is answer1"`` ...
``"answer4"``): :func:`multiple_choice` runs the network once on the prompt and the part the
candidates share (with a KV cache, per draw), then only on each candidate's remaining tokens,
and computes the LM head only where a scored token is predicted. The scores equal those of
one full forward pass per candidate (tested); K-way scoring costs about one pass of the prompt.

Example:
    >>> import torch
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import CharTokenizer, tiny_llama
    >>> mc = MonteCLoRA.from_model(tiny_llama(), lora_r=4)
    >>> out = multiple_choice(mc, ["is ice hot?"], ["it is true", "it is false"], num_samples=3,
    ...                       tokenizer=CharTokenizer())
    >>> out["probs"].shape, out["sample_log_likelihood"].shape
    (torch.Size([1, 2]), torch.Size([3, 1, 2]))
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .data import encode_prompt_completion, format_instruction, pad_token_id
from .layers import noise_context
from .models.likelihood import IGNORE_INDEX
from .models.model import supports_logits_to_keep
from .monteclora import device_of
from .predictive import Predictive, _batches, _eval_mode, _repeat, _tokenizer, predictive_summary

__all__ = [
    "sequence_log_likelihood", "multiple_choice", "instruction_choices", "candidate_completions", "candidate_scores",
    "network_candidate_scores",
]


def _prompt_text(prompt: Union[str, Mapping[str, Any]]) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping) and "instruction" in prompt:
        return format_instruction(dict(prompt))
    if isinstance(prompt, Mapping) and "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError(f"a prompt must be a string or a row with 'instruction' (or 'prompt'), got {prompt!r}")


def _scored_examples(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], append_eos: bool) -> list[dict]:
    """``input_ids`` = prompt + completion (+ eos), ``labels`` = IGNORE on the prompt: as in training."""
    examples = encode_prompt_completion(tokenizer, list(prompts), list(completions), append_eos)
    if any(all(label == IGNORE_INDEX for label in e["labels"]) for e in examples):
        raise ValueError("an empty completion (and no eos token) has nothing to score")
    return examples


def _causal_lm(monteclora: Any) -> None:
    if monteclora.task != "causal_lm":
        raise ValueError(f"this needs a causal LM MonteCLoRA model, got task={monteclora.task!r}")


def _sample_scores(predictive: Predictive, examples: list[dict], pad_id: int, batch_size: int) -> torch.Tensor:
    parts = [predictive.sample_sequence_log_likelihood(b) for b in _batches(examples, pad_id, batch_size)]
    return torch.cat(parts, dim=1)


def sequence_log_likelihood(
    monteclora: Any,
    prompts: Sequence[Union[str, Mapping[str, Any]]],
    completions: Sequence[str],
    num_samples: int = 8,
    seed: Optional[int] = 0,
    mode: str = "sample",
    tokenizer: Any = None,
    batch_size: int = 16,
    append_eos: bool = True,
    vectorize: bool = True,
) -> torch.Tensor:
    """Log-likelihood ``(n,)`` of each completion given its prompt under the posterior predictive.

    ``log p(c | x) = log (1/S) sum_s p(c | x, A~_s)``, computed with a logsumexp over the S
    draws. The completion's tokens (plus eos when ``append_eos``, as in training) are scored.
    Prompts are strings or instruction rows (formatted by :func:`pyro_monteclora.data.format_instruction`).
    """
    _causal_lm(monteclora)
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
    tokenizer = _tokenizer(monteclora, tokenizer)
    examples = _scored_examples(tokenizer, [_prompt_text(p) for p in prompts], completions, append_eos)
    predictive = Predictive(monteclora, num_samples, seed, mode, vectorize=vectorize)
    per_draw = _sample_scores(predictive, examples, pad_token_id(tokenizer), batch_size).double()
    return (torch.logsumexp(per_draw, 0) - math.log(per_draw.shape[0])).float()


def multiple_choice(
    monteclora: Any,
    prompts: Sequence[Union[str, Mapping[str, Any]]],
    candidates: Sequence[Any],
    num_samples: int = 8,
    seed: Optional[int] = 0,
    mode: str = "sample",
    tokenizer: Any = None,
    batch_size: int = 16,
    append_eos: bool = True,
    return_samples: bool = False,
    vectorize: bool = True,
    share_prompt: bool = True,
) -> dict[str, torch.Tensor]:
    """Predictive distribution over K candidate completions per prompt.

    Per draw s, the candidates' sequence log-likelihoods ``log p(c_k | x, A~_s)`` are
    normalized over the K candidates (a softmax); the predictive ``probs`` ``(n, K)`` average
    these per-draw distributions, with ``entropy``, ``expected_entropy``,
    ``mutual_information`` as in :class:`~pyro_monteclora.Predictive` and
    ``sample_log_likelihood`` ``(S, n, K)``.

    ``candidates``: one list of K completions shared by every prompt, or one list per prompt
    (all of length K). For the instruction data (``"the correct answer is true"``), see
    :func:`instruction_choices`. ``batch_size`` counts sequences (prompt x candidate).
    ``share_prompt`` runs the prompt and the candidates' shared tokens once per draw (KV cache;
    see the module docstring); ``False`` runs one full pass per candidate. Same scores.
    """
    _causal_lm(monteclora)
    n = len(prompts)
    if n == 0:
        raise ValueError("multiple_choice needs at least one prompt")
    if candidates and all(isinstance(c, str) for c in candidates):
        per_prompt = [list(candidates)] * n
    else:
        per_prompt = [list(c) for c in candidates]
    if len(per_prompt) != n:
        raise ValueError(f"got {n} prompts but {len(per_prompt)} candidate lists")
    k = len(per_prompt[0])
    if k < 2 or any(len(c) != k for c in per_prompt):
        raise ValueError(f"every prompt needs the same number (>= 2) of candidates, got {sorted({len(c) for c in per_prompt})}")
    tokenizer = _tokenizer(monteclora, tokenizer)
    texts = [_prompt_text(p) for p in prompts]
    examples = _scored_examples(
        tokenizer, [t for t in texts for _ in range(k)], [c for cands in per_prompt for c in cands], append_eos
    )
    predictive = Predictive(monteclora, num_samples, seed, mode, vectorize=vectorize)
    scores = candidate_scores(predictive, examples, k, pad_token_id(tokenizer), batch_size, share_prompt)
    out = predictive_summary(torch.log_softmax(scores, dim=-1), return_samples)
    out["sample_log_likelihood"] = scores
    return out


def candidate_scores(
    predictive: Predictive, examples: list[dict], k: int, pad_id: int, batch_size: int, share_prompt: bool = True
) -> torch.Tensor:
    """Per-draw sequence log-likelihoods ``(S, n, K)`` of ``n * K`` scored examples (prompt-major)."""
    network = predictive.monteclora.network
    groups = [examples[i : i + k] for i in range(0, len(examples), k)]
    prefixes = [_shared_length([e["input_ids"] for e in group]) for group in groups]
    if not share_prompt or _cache_argument(network) is None or min(prefixes) < 1:
        scores = _sample_scores(predictive, examples, pad_id, batch_size)
        return scores.reshape(scores.shape[0], len(groups), k)
    per_batch = max(1, batch_size // k)
    parts = []
    with _eval_mode(predictive.monteclora), torch.no_grad():
        for start in range(0, len(groups), per_batch):
            chunk, lengths = groups[start : start + per_batch], prefixes[start : start + per_batch]
            noise = predictive.draw_noise()  # one set of S adapters for the prompt and the candidates
            if noise is None:
                parts.append(_shared_prompt_scores(network, chunk, lengths, pad_id, 1))
            elif predictive.vectorize:
                with noise_context(predictive.monteclora.groups, noise):
                    parts.append(_shared_prompt_scores(network, chunk, lengths, pad_id, predictive.num_samples))
            else:
                draws = []
                for s in range(predictive.num_samples):
                    with noise_context(predictive.monteclora.groups, {g: v[s] for g, v in noise.items()}):
                        draws.append(_shared_prompt_scores(network, chunk, lengths, pad_id, 1)[0])
                parts.append(torch.stack(draws))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def network_candidate_scores(
    network: Any, examples: list[dict], k: int, pad_id: int, batch_size: int = 16, repeats: int = 1
) -> torch.Tensor:
    """Sequence log-likelihoods ``(repeats, n, K)`` of scored examples under any causal LM.

    For networks that are not a :class:`~pyro_monteclora.MonteCLoRA` (a plain peft LoRA model,
    another method's adapter): the same shared-prompt computation as :func:`multiple_choice`,
    the batch run ``repeats`` times (for MC dropout: the caller puts dropout in training mode,
    and every repeat gets its own masks; the K candidates of a prompt share the prompt's mask).
    Modes are the caller's.
    """
    groups = [examples[i : i + k] for i in range(0, len(examples), k)]
    prefixes = [_shared_length([e["input_ids"] for e in group]) for group in groups]
    if _cache_argument(network) is None or min(prefixes) < 1:
        raise ValueError("network_candidate_scores needs a causal LM that takes a KV cache and position_ids")
    per_batch = max(1, batch_size // k)
    parts = [
        _shared_prompt_scores(network, groups[i : i + per_batch], prefixes[i : i + per_batch], pad_id, repeats)
        for i in range(0, len(groups), per_batch)
    ]
    return torch.cat(parts, dim=1)


def _cache_argument(network: Any) -> Optional[str]:
    """The name under which the LM's ``forward`` takes a KV cache (transformers 5.2x: ``cache``,
    before: ``past_key_values``), or ``None`` if it takes none (or no ``position_ids``)."""
    base = network.get_base_model() if hasattr(network, "get_base_model") else network
    parameters = inspect.signature(base.forward).parameters
    if "position_ids" not in parameters:
        return None
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _shared_length(sequences: list[list[int]]) -> int:
    """Tokens all sequences share at their start, keeping at least one own token in each."""
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def _shared_prompt_scores(network: Any, groups: list[list[dict]], prefixes: list[int], pad_id: int, draws: int) -> torch.Tensor:
    """Scores ``(draws, prompts, K)``: the shared prefix (left-padded, cached), then each candidate's rest.

    The rows are repeated ``draws`` times (sample-major): an open noise context holds ``draws``
    adapters, or one (``draws = 1``).
    """
    device = device_of(network)
    b, k, width = len(groups), len(groups[0]), max(prefixes)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    keep, keep_valid, targets = [], [], []
    for i, (group, length) in enumerate(zip(groups, prefixes)):
        offset = width - length
        ids[i, offset:] = torch.tensor(group[0]["input_ids"][:length])
        mask[i, offset:] = 1
        labels = group[0]["labels"]
        scored = [j for j in range(1, length) if labels[j] != IGNORE_INDEX]
        keep.append([offset + j - 1 for j in scored] + [width - 1])  # the last one predicts each candidate's own start
        targets.append([group[0]["input_ids"][j] for j in scored])
    m = max(len(p) for p in keep)
    keep_valid = torch.tensor([[True] * (len(p) - 1) + [False] * (m - len(p)) + [False] for p in keep])
    positions = torch.tensor([p[:-1] + [p[-1]] * (m - len(p)) + [p[-1]] for p in keep])  # last column: width - 1
    target_ids = torch.tensor([t + [0] * (m - 1 - len(t)) + [0] for t in targets])
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
    inputs = {key: value.to(device) for key, value in _repeat(inputs, draws).items()}
    positions, keep_valid, target_ids = (t.to(device) for t in (positions, keep_valid, target_ids))
    rows_positions = positions.repeat(draws, 1)
    logits_on = supports_logits_to_keep(network)
    out = network(**inputs, use_cache=True, **({"logits_to_keep": rows_positions} if logits_on else {}))
    logits = out.logits if logits_on else out.logits.gather(
        1, rows_positions[..., None].expand(-1, -1, out.logits.shape[-1])
    )
    log_probs = torch.log_softmax(logits.float(), dim=-1).reshape(draws, b, m, -1)
    picked = log_probs.gather(-1, target_ids.expand(draws, b, m)[..., None]).squeeze(-1)
    shared = (picked * keep_valid).sum(-1)  # (draws, b)
    first = log_probs[:, :, -1]  # (draws, b, V): predicts the first token of each candidate's own part

    rests = [[e["input_ids"][length:] for e in group] for group, length in zip(groups, prefixes)]
    scored = [[[e["labels"][j] != IGNORE_INDEX for j in range(length, len(e["input_ids"]))] for e in group]
              for group, length in zip(groups, prefixes)]
    rest_width = max(len(r) for rest in rests for r in rest)
    rest_ids = torch.full((b, k, rest_width), pad_id, dtype=torch.long)
    rest_mask = torch.zeros(b, k, rest_width, dtype=torch.long)
    rest_scored = torch.zeros(b, k, rest_width, dtype=torch.bool)
    for i in range(b):
        for j in range(k):
            rest = rests[i][j]
            rest_ids[i, j, : len(rest)] = torch.tensor(rest)
            rest_mask[i, j, : len(rest)] = 1
            rest_scored[i, j, : len(rest)] = torch.tensor(scored[i][j])
    rest_ids, rest_mask, rest_scored = (t.to(device) for t in (rest_ids, rest_mask, rest_scored))
    first_scores = first.gather(-1, rest_ids[None, :, :, 0].expand(draws, b, k)) * rest_scored[None, :, :, 0]
    if rest_width == 1:  # each candidate's own part is one token, scored from the prompt pass
        return shared[..., None] + first_scores
    argument = _cache_argument(network)
    cache = out[argument]
    cache.batch_repeat_interleave(k)  # rows (draw, prompt) -> (draw, prompt, candidate)
    prefix_mask = inputs["attention_mask"].repeat_interleave(k, dim=0)
    start = torch.tensor(prefixes, device=device)[:, None, None] + torch.arange(rest_width, device=device)
    rest_inputs = {  # the last token is input too (its logits go unused): no candidate has an empty input
        "input_ids": rest_ids.reshape(b * k, rest_width).repeat(draws, 1),
        "attention_mask": torch.cat([prefix_mask, rest_mask.reshape(b * k, rest_width).repeat(draws, 1)], dim=1),
        "position_ids": start.expand(b, k, rest_width).reshape(b * k, rest_width).repeat(draws, 1),
    }
    rest_logits = network(**rest_inputs, **{argument: cache}, use_cache=True).logits
    rest_log_probs = torch.log_softmax(rest_logits[:, :-1].float(), dim=-1).reshape(draws, b, k, rest_width - 1, -1)
    following = rest_ids[:, :, 1:].expand(draws, b, k, rest_width - 1)
    rest_picked = rest_log_probs.gather(-1, following[..., None]).squeeze(-1)
    rest_scores = (rest_picked * rest_scored[None, :, :, 1:]).sum(-1)
    return shared[..., None] + first_scores + rest_scores


ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\s]+)")


def instruction_choices(row: Mapping[str, Any]) -> tuple[list[str], int]:
    """Candidate completions and the index of the right one for an instruction row.

    The rows of the commonsense sets end their instruction with ``Answer format: a/b/...`` and
    have ``output = "the correct answer is <answer>"``; the candidates are that output with
    each allowed answer in place of the true one.
    """
    match = ANSWER_FORMAT.search(row.get("instruction", ""))
    if match is None or "answer" not in row or "output" not in row:
        raise ValueError("an instruction row needs 'Answer format: a/b/...' in its instruction, and 'output' and 'answer'")
    choices = match.group(1).split("/")
    answer, output = str(row["answer"]), str(row["output"])
    if answer not in choices:
        raise ValueError(f"answer {answer!r} is not among the allowed answers {choices}")
    if not output.endswith(answer):
        raise ValueError(f"output {output!r} does not end with the answer {answer!r}")
    prefix = output[: len(output) - len(answer)]
    return [prefix + c for c in choices], choices.index(answer)


#: How the commonsense sets word an answer (``output = "the correct answer is <answer>"``).
ANSWER_PREFIX = "the correct answer is "


def candidate_completions(row: Mapping[str, Any], prefix: str = ANSWER_PREFIX) -> list[str]:
    """The candidate completions of an instruction row that need not carry its answer (for prediction).

    ``prefix`` + each answer of the row's ``Answer format: a/b/...``; a row with ``output`` and
    ``answer`` uses its own wording, as :func:`instruction_choices` does.

    Example:
        >>> candidate_completions({"instruction": "Is ice cold?\\n\\nAnswer format: true/false"})
        ['the correct answer is true', 'the correct answer is false']
    """
    if "output" in row and "answer" in row:
        return instruction_choices(row)[0]
    match = ANSWER_FORMAT.search(str(row.get("instruction", "")))
    if match is None:
        raise ValueError("an instruction row needs 'Answer format: a/b/...' in its instruction to have candidate answers")
    return [prefix + choice for choice in match.group(1).split("/")]
