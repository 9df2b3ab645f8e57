"""pyro_monteclora as an lm-evaluation-harness model: the posterior predictive behind ``lm_eval``.

:class:`MonteCLoRALM` is an ``lm_eval.api.model.LM`` registered as ``"monteclora"`` when this
module is imported. Like lm-eval's ``HFLM`` it takes a loaded model or paths:

- ``MonteCLoRALM(monteclora, tokenizer=tok, num_samples=8)`` for a model in memory;
- ``MonteCLoRALM(pretrained=BASE, adapter=FOLDER, num_samples=8)`` (``gguf_file=`` for a GGUF base,
  ``pretrained=smollm2`` for the packaged SmolLM2), which is what
  ``pyro-monteclora lm-eval --model monteclora --model_args pretrained=...,adapter=...,num_samples=8
  --tasks ... --include_path ...`` builds (lm-eval itself reads no plugins, so the stock
  ``lm_eval`` command cannot see the registration; ours imports it, then runs lm-eval's own CLI).

``loglikelihood`` returns for each request ``(log p(continuation | context), is_greedy)`` with
``log p = log (1/S) sum_s p(continuation | context, A~_s)``, the posterior-predictive
log-likelihood over ``num_samples`` seeded draws (``num_samples=0``: the mean adapter, which
equals ``HFLM`` on the peft model). ``is_greedy`` is true when the continuation is the greedy one
under every draw. Requests that share a context are scored on one pass of it (the shared-prompt
engine), and are tokenized as ``HFLM`` tokenizes them
(:func:`~pyro_monteclora.data.tokenize.encode_context_continuation`); a request longer than
``max_length + 1`` tokens keeps its last ``max_length + 1``, as lm-eval's does.
``loglikelihood_rolling`` uses lm-eval's own rolling windows and sums each draw's windows before
combining the draws. Generation (``generate_until``) is not supported: it raises a clear error.

Needs the ``eval`` extra (``pip install 'pyro-monteclora[eval]'``, lm-eval 0.4.x).

Example:
    >>> from lm_eval.api.instance import Instance
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bpe_tokenizer, tiny_llama
    >>> tokenizer = tiny_bpe_tokenizer()
    >>> mc = MonteCLoRA.from_model(tiny_llama(vocab_size=len(tokenizer)), lora_r=4)
    >>> lm = MonteCLoRALM(mc, tokenizer=tokenizer, num_samples=4)
    >>> request = Instance("loglikelihood", {}, ("Question: Is ice cold?\\nAnswer:", " yes"), 0)
    >>> (log_likelihood, greedy), = lm.loglikelihood([request])
    >>> log_likelihood < 0, isinstance(greedy, bool)
    (True, True)
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: registering into an empty registry hides them)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - the eval extra is installed with the test extra
    raise ImportError("the lm-eval model needs lm-eval 0.4.x: pip install 'pyro-monteclora[eval]'") from error

from ..data.tokenize import encode_context_continuation, pad_token_id
from ..models.likelihood import IGNORE_INDEX
from ..monteclora import device_of, load
from .draws import log_mean_exp
from .predictive import Predictive, tokenizer_of
from .shared_prompt import candidate_scores

__all__ = ["MonteCLoRALM", "MODEL_NAME"]

#: The name lm-eval knows the model by (``--model monteclora``).
MODEL_NAME = "monteclora"


def _load(pretrained: str, adapter: Optional[str], gguf_file: Optional[str], device: Optional[str]) -> Any:
    """A :class:`~pyro_monteclora.MonteCLoRA` from a base (folder, GGUF file or ``smollm2``) and an adapter folder."""
    from ..examples import SMOLLM2_FILE, load_gguf, smollm2_path

    if adapter is None:
        raise ValueError("MonteCLoRALM(pretrained=...) needs adapter=<a folder saved by pyro_monteclora> "
                         "(or pass a MonteCLoRA model object)")
    if pretrained == "smollm2":
        pretrained, gguf_file = smollm2_path(), SMOLLM2_FILE
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(pretrained, gguf_file)):
            raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {pretrained!r}")
        base, _ = load_gguf(pretrained, gguf_file)
        return load(base, adapter, device=device)
    return load(pretrained, adapter, device=device)


class MonteCLoRALM(LM):
    """The posterior predictive of a MonteCLoRA causal LM as an lm-evaluation-harness model.

    Args:
        pretrained: a :class:`~pyro_monteclora.MonteCLoRA` causal LM, or the base model (a folder,
            a folder with ``gguf_file``, or ``"smollm2"``) whose ``adapter`` folder is loaded.
        adapter: the adapter folder (``save_pretrained`` / ``train(output_dir=...)``) for a path base.
        tokenizer: the tokenizer (default: the model's own, as saved with the adapter).
        num_samples: S, adapters drawn per request (``0``: the mean adapter).
        seed: seed of the draws: every batch uses the same S adapters.
        batch_size: scored sequences per forward pass (lm-eval passes it as text; ``"auto"`` is 16).
        max_length: the longest input (default: the model's ``max_position_embeddings``).
        add_bos_token: as lm-eval's ``HFLM`` (``None``: the tokenizer's default).
        device, max_batch_size, gguf_file: as lm-eval's ``HFLM``.
    """

    def __init__(
        self,
        pretrained: Any = None,
        adapter: Optional[str] = None,
        tokenizer: Any = None,
        num_samples: int = 8,
        seed: int = 0,
        batch_size: Union[int, str] = 16,
        max_length: Optional[int] = None,
        add_bos_token: Optional[bool] = None,
        device: Optional[str] = None,
        max_batch_size: Optional[int] = None,
        gguf_file: Optional[str] = None,
    ) -> None:
        super().__init__()
        if isinstance(pretrained, str):
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval's CLI asks for cuda:0 by default; on a CPU machine stay on the CPU
            pretrained = _load(pretrained, adapter, gguf_file, device)
        if pretrained is None or getattr(pretrained, "task", None) != "causal_lm":
            raise ValueError("MonteCLoRALM needs a causal-LM MonteCLoRA model (or pretrained=<base>, adapter=<folder>), "
                             f"got {type(pretrained).__name__}")
        batch_size = 16 if str(batch_size).startswith("auto") else batch_size
        try:
            batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}") from None
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        self.monteclora = pretrained
        self.tokenizer = tokenizer_of(pretrained, tokenizer)
        self.predictive = Predictive(pretrained, num_samples, seed)  # validates num_samples and seed
        self.batch_size_per_gpu = batch_size
        self.add_bos_token = add_bos_token
        config = getattr(pretrained.network, "config", None)
        self._max_length = int(max_length or getattr(config, "max_position_embeddings", None) or 2048)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return device_of(self.monteclora)

    @property
    def eot_token_id(self) -> Optional[int]:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> Optional[int]:
        """lm-eval's prefix token: bos, else eos."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    # --- scoring ---------------------------------------------------------------------------------

    def _examples(self, pairs: list[tuple[str, str]]) -> list[dict[str, list[int]]]:
        examples = encode_context_continuation(self.tokenizer, [c for c, _ in pairs], [x for _, x in pairs],
                                               self.add_bos_token, self.prefix_token_id)
        return [self._truncated(e["input_ids"], e["labels"]) for e in examples]

    def _truncated(self, ids: list[int], labels: list[int]) -> dict[str, list[int]]:
        keep = self.max_length + 1  # lm-eval keeps the last max_length + 1 tokens of context + continuation
        ids, labels = ids[-keep:], labels[-keep:]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    def score(self, examples: list[dict[str, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-draw log-likelihoods ``(S, n)`` and greedy flags ``(S, n)`` of scored examples.

        Examples with the same unscored context are scored together on one pass of it; contexts
        with as many continuations are batched together (no padding to another context's count).
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, example in enumerate(examples):
            context = tuple(t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX)
            groups.setdefault(context, []).append(i)
        by_count: dict[int, list[list[int]]] = {}
        for members in groups.values():
            by_count.setdefault(len(members), []).append(members)
        scores = torch.empty(self.predictive.draws, len(examples), dtype=torch.float64)
        greedy = torch.empty(self.predictive.draws, len(examples), dtype=torch.bool)
        for count, bucket in by_count.items():
            order = [i for members in bucket for i in members]
            part, flags = candidate_scores(self.predictive, [examples[i] for i in order], count,
                                           pad_token_id(self.tokenizer), self.batch_size, return_greedy=True)
            scores[:, order] = part.reshape(part.shape[0], -1).cpu().double()
            greedy[:, order] = flags.reshape(flags.shape[0], -1).cpu()
        return scores, greedy

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(predictive log-likelihood, is_greedy)`` of each ``(context, continuation)`` request."""
        if not requests:
            return []
        scores, greedy = self.score(self._examples([tuple(r.args) for r in requests]))
        results = [(float(v), bool(g)) for v, g in zip(log_mean_exp(scores), greedy.all(0))]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Predictive log-likelihood of each whole string, over lm-eval's rolling windows."""
        if not requests:
            return []
        examples, owner = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            special = {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}
            tokens = self.tokenizer([text], **special)["input_ids"][0]
            windows = get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, windows):
                examples.append(self._truncated(list(context) + list(continuation),
                                                [IGNORE_INDEX] * len(context) + list(continuation)))
                owner.append(index)
        scores, _ = self.score(examples)
        per_string = torch.zeros(scores.shape[0], len(requests), dtype=scores.dtype)
        per_string.index_add_(1, torch.tensor(owner), scores)  # each draw's windows summed, then the draws combined
        results = [float(v) for v in log_mean_exp(per_string)]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, result)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "MonteCLoRALM scores log-likelihoods (multiple-choice and perplexity tasks); generation tasks are not "
            "supported: run them with lm-eval's hf model on the saved mean adapter (--model hf --model_args "
            "pretrained=<base>,peft=<adapter folder>)"
        )


if MODEL_NAME not in MODEL_REGISTRY.keys():  # importing twice (or a reload) must not register twice
    register_model(MODEL_NAME)(MonteCLoRALM)
