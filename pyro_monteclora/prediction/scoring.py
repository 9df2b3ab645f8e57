"""Causal-LM scoring under the posterior predictive: completions and multiple-choice candidates.

- :func:`sequence_log_likelihood`: ``log p(c | x) = log (1/S) sum_s p(c | x, A~_s)`` for given
  prompts and completions;
- :func:`multiple_choice`: per draw, the candidates' sequence log-likelihoods normalized over
  the K candidates; the predictive averages these per-draw distributions;
- :func:`instruction_choices`: the candidates of a commonsense instruction row.

Candidates usually share most of their tokens (``"the correct answer is answer1"`` ...
``"answer4"``): :func:`multiple_choice` scores them with the shared-prompt engine of
:mod:`.shared_prompt` (one pass of the prompt per draw, the candidates on its KV cache).
For rows scored as lm-evaluation-harness scores them, see :mod:`.choices`.

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

import re
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ..data.tokenize import encode_prompt_completion, format_instruction, pad_token_id
from ..models.likelihood import IGNORE_INDEX
from .draws import log_mean_exp, normalize_per_draw, predictive_summary
from .predictive import Predictive, tokenizer_of
from .shared_prompt import ragged_candidate_scores, sample_scores

__all__ = [
    "sequence_log_likelihood", "multiple_choice", "instruction_choices", "candidate_completions", "scored_examples",
]


def _prompt_text(prompt: Union[str, Mapping[str, Any]]) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping) and "instruction" in prompt:
        return format_instruction(dict(prompt))
    if isinstance(prompt, Mapping) and "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError(f"a prompt must be a string or a row with 'instruction' (or 'prompt'), got {prompt!r}")


def scored_examples(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], append_eos: bool) -> list[dict]:
    """``input_ids`` = prompt + completion (+ eos), ``labels`` = IGNORE on the prompt: as in training."""
    examples = encode_prompt_completion(tokenizer, list(prompts), list(completions), append_eos)
    if any(all(label == IGNORE_INDEX for label in e["labels"]) for e in examples):
        raise ValueError("an empty completion (and no eos token) has nothing to score")
    return examples


def _causal_lm(monteclora: Any) -> None:
    if monteclora.task != "causal_lm":
        raise ValueError(f"this needs a causal LM MonteCLoRA model, got task={monteclora.task!r}")


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
    tokenizer = tokenizer_of(monteclora, tokenizer)
    examples = scored_examples(tokenizer, [_prompt_text(p) for p in prompts], completions, append_eos)
    predictive = Predictive(monteclora, num_samples, seed, mode, vectorize=vectorize)
    return log_mean_exp(sample_scores(predictive, examples, pad_token_id(tokenizer), batch_size)).float()


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
    (the lists may differ in length; the outputs are padded to the longest, an absent candidate
    with probability 0 and score ``-inf``). For the instruction data (``"the correct answer is true"``), see
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
    tokenizer = tokenizer_of(monteclora, tokenizer)
    examples = scored_examples(
        tokenizer, [_prompt_text(p) for p, cands in zip(prompts, per_prompt) for _ in cands],
        [c for cands in per_prompt for c in cands], append_eos,
    )
    predictive = Predictive(monteclora, num_samples, seed, mode, vectorize=vectorize)
    scores = ragged_candidate_scores(predictive, examples, [len(c) for c in per_prompt], pad_token_id(tokenizer),
                                     batch_size, share_prompt)
    out = predictive_summary(normalize_per_draw(scores), return_samples)
    out["sample_log_likelihood"] = scores.float()
    return out


ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\s]+)")


def instruction_choices(row: Mapping[str, Any]) -> tuple[list[str], int]:
    """Candidate completions and the index of the right one for an instruction row.

    The rows of the commonsense sets end their instruction with ``Answer format: a/b/...`` and
    have ``output = "the correct answer is <answer>"``; the candidates are that output with
    each allowed answer in place of the true one.
    """
    match = ANSWER_FORMAT.search(row.get("instruction", ""))
    if match is None or row.get("answer") is None or row.get("output") is None:  # None: a file's row without it
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
    if row.get("output") is not None and row.get("answer") is not None:  # a file's rows may lack them: None
        return instruction_choices(row)[0]
    match = ANSWER_FORMAT.search(str(row.get("instruction", "")))
    if match is None:
        raise ValueError("an instruction row needs 'Answer format: a/b/...' in its instruction to have candidate answers")
    return [prefix + choice for choice in match.group(1).split("/")]
