"""Posterior predictive of a MonteCLoRA model: probabilities with their uncertainty split.

``Predictive(monteclora, num_samples=S)`` is a thin layer in the spirit of
``pyro.infer.Predictive``: it draws S adapters from the guide (one vectorized guide call under
``pyro.plate("samples", S, dim=-2)``), runs the real network once on the batch repeated S times
(sample-major; each block of rows reads its own noise) and averages the per-draw class
*probabilities* (never the logits)::

    probs               p(y | x) ≈ (1/S) sum_s p(y | x, A~_s)
    entropy             H[p(y | x)]                       total (predictive) uncertainty
    expected_entropy    (1/S) sum_s H[p(y | x, A~_s)]     aleatoric part
    mutual_information  entropy - expected_entropy ≥ 0    epistemic part (disagreement of draws)

For causal language models, :mod:`pyro_monteclora.prediction.scoring` scores given completions
(``sequence_log_likelihood``) and turns the scores of candidate answers into a predictive
distribution over the candidates with the same uncertainty outputs (``multiple_choice``).

Example:
    >>> import torch
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert
    >>> mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    >>> batch = {"input_ids": torch.tensor([[1, 5, 2], [1, 7, 2]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    >>> out = Predictive(mc, num_samples=4, seed=0)(batch)
    >>> sorted(out)
    ['entropy', 'expected_entropy', 'mutual_information', 'probs']
    >>> out["probs"].shape, bool(torch.allclose(out["probs"].sum(-1), torch.ones(2)))
    (torch.Size([2, 2]), True)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..data.tokenize import batches, encode_texts, pad_token_id
from ..layers import noise_context
from ..models.likelihood import IGNORE_INDEX, target_positions
from ..models.model import NON_INPUT_KEYS
from ..monteclora import device_of
from ..quiet import quiet
from .draws import draw_latents, eval_mode, log_mean_exp, predictive_summary, repeat_rows, seeded

__all__ = ["Predictive", "predict", "predictive_summary", "draw_latents", "tokenizer_of", "MODES"]

MODES = ("sample", "mean")


def _inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k not in NON_INPUT_KEYS}



def _token_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over kept positions of ``log p(labels[t] | < t)``: ``(..., L, V)``, ``(..., L)`` -> ``(...)``."""
    log_probs = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
    targets = labels[..., 1:].expand(log_probs.shape[:-1])
    keep = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, torch.where(keep, targets, torch.zeros_like(targets)).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


# --- the public layer --------------------------------------------------------------------------


class Predictive(nn.Module):
    """Posterior predictive of a :class:`~pyro_monteclora.MonteCLoRA` model, via its guide.

    Args:
        monteclora: the trained model (network, Pyro model and guide).
        num_samples: S, adapters drawn from the guide per call; ``0`` means the mean adapter.
        seed: seed of the draws. With a seed, every call draws the *same* S adapters (a fixed
            ensemble, so results do not depend on how a dataset is batched) and the caller's
            global RNG is left untouched (``torch.random.fork_rng``). ``None`` draws fresh
            adapters from the global RNG at each call.
        mode: ``"sample"`` (posterior predictive) or ``"mean"`` (deterministic mean adapter
            ``E[A~] = A``; mutual information 0).
        return_samples: also return ``sample_probs``, the ``(S, n, C)`` per-draw probabilities.
        vectorize: one forward pass on the batch repeated S times (sample-major) with
            ``(S, layers, r, d)`` noise; ``False`` loops S forward passes on the batch (less
            memory). The draws are the same either way.

    Calling it on a batch (``input_ids``, ``attention_mask``, ...; ``labels``/``index`` are
    ignored) returns ``probs``, ``entropy``, ``expected_entropy`` and ``mutual_information``
    per example (for a causal LM: per position, over the vocabulary). The network is in eval
    mode during the call (no dropout) and gradients are off.
    """

    def __init__(
        self,
        monteclora: Any,
        num_samples: int = 8,
        seed: Optional[int] = None,
        mode: str = "sample",
        return_samples: bool = False,
        vectorize: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.monteclora = monteclora
        self.num_samples = num_samples
        self.seed = seed
        self.mode = "mean" if num_samples == 0 else mode
        self.return_samples = return_samples
        self.vectorize = vectorize

    @property
    def draws(self) -> int:
        """Number of adapters per prediction (1 for the mean adapter)."""
        return 1 if self.mode == "mean" else self.num_samples

    @torch.no_grad()
    def draw_noise(self) -> Optional[dict[str, torch.Tensor]]:
        """The noise on A of the S adapters, ``{group: (S, layers, r, d)}`` (``None``: the mean adapter).

        Seeded, every call returns the same draws; ``seed=None`` draws afresh from the global RNG.
        """
        if self.mode == "mean":
            return None
        with seeded(self.seed, device_of(self.monteclora)):
            return self.monteclora.model.noise(draw_latents(self.monteclora, self.num_samples))

    @torch.no_grad()
    def sample_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-draw logits ``(S, n, ...)`` (``S = 1`` for the mean adapter)."""
        monteclora = self.monteclora
        device = device_of(monteclora)
        inputs = _inputs(batch, device)
        network = monteclora.network
        with eval_mode(monteclora):
            if self.mode == "mean":
                return network(**inputs).logits.unsqueeze(0)
            noise = self.draw_noise()
            if self.vectorize:
                with noise_context(monteclora.groups, noise):
                    logits = network(**repeat_rows(inputs, self.num_samples)).logits
                return logits.reshape(self.num_samples, -1, *logits.shape[1:])
            per_draw = []
            for s in range(self.num_samples):
                with noise_context(monteclora.groups, {name: value[s] for name, value in noise.items()}):
                    per_draw.append(network(**inputs).logits)
            return torch.stack(per_draw)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        log_probs = torch.log_softmax(self.sample_logits(batch).float(), dim=-1)
        return predictive_summary(log_probs, self.return_samples)

    def sample_sequence_log_likelihood(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-draw log-likelihood ``(S, n)`` of each sequence's kept ``labels`` (causal LM).

        ``labels`` are aligned with ``input_ids``, ``IGNORE_INDEX`` on prompt and padding
        positions (as in training); position ``t`` is predicted from the positions before it.
        """
        if "labels" not in batch:
            raise ValueError("sequence log-likelihoods need batch['labels'] (IGNORE_INDEX on unscored positions)")
        labels = batch["labels"].to(device_of(self.monteclora))
        positions, valid = target_positions(labels)  # the LM head on the scored positions only
        if not self.monteclora.model.logits_on_targets or positions.shape[1] >= labels.shape[1] - 1:
            logits = self.sample_logits(batch)
            return _token_log_likelihood(logits, labels)
        logits = self.sample_logits({**batch, "logits_to_keep": positions})  # (S, n, K, V)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.where(valid, labels.gather(1, positions + 1), torch.zeros_like(positions))
        picked = log_probs.gather(-1, targets.expand(log_probs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        return (picked * valid).sum(-1)

    def sequence_log_likelihood(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``log_likelihood`` ``(n,)``: ``log (1/S) sum_s p(labels | inputs, A~_s)`` (a stable
        logsumexp), and ``sample_log_likelihood`` ``(S, n)``, the per-draw terms."""
        per_draw = self.sample_sequence_log_likelihood(batch)
        return {"log_likelihood": log_mean_exp(per_draw).float(), "sample_log_likelihood": per_draw.float()}


# --- whole datasets --------------------------------------------------------------------------


def tokenizer_of(monteclora: Any, tokenizer: Any = None) -> Any:
    """``tokenizer``, else the model's own; a clear error when neither is known."""
    if tokenizer is None:
        tokenizer = getattr(monteclora, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=... (or train the model with one)")
    return tokenizer


def _classification_examples(monteclora: Any, data: Any, tokenizer: Any) -> list[dict]:
    """Tokenized examples from strings, rows with ``text`` (and ``text_pair``) or tokenized rows."""
    rows = list(data) if not isinstance(data, str) else [data]
    if not rows:
        raise ValueError("predict() got no inputs: the list of texts (or rows) is empty")
    if rows and all(isinstance(r, str) for r in rows):
        rows = [{"text": r} for r in rows]
    if rows and all(isinstance(r, Mapping) and "input_ids" in r for r in rows):
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return [{k: list(r[k]) for k in keys if k in r} for r in rows]
    if not rows or not all(isinstance(r, Mapping) and "text" in r for r in rows):
        raise ValueError("predict() needs strings, rows with a 'text' column, or tokenized rows with 'input_ids'")
    tokenizer = tokenizer_of(monteclora, tokenizer)
    pairs = [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None
    return encode_texts(tokenizer, [r["text"] for r in rows], pairs, monteclora.monteclora_config.max_length)


def predict(
    monteclora: Any,
    data: Any,
    num_samples: int = 8,
    batch_size: int = 32,
    seed: Optional[int] = 0,
    mode: str = "sample",
    tokenizer: Any = None,
    return_samples: bool = False,
    vectorize: bool = True,
) -> dict[str, torch.Tensor]:
    """:class:`Predictive` outputs for a whole classification dataset, batch by batch.

    ``data``: a list of strings, a ``datasets.Dataset`` / list of rows with ``text`` (and
    optionally ``text_pair``) or already tokenized rows with ``input_ids``. Outputs are
    concatenated over the dataset in order (``sample_probs`` along its second dimension).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if monteclora.task != "classification":
        raise ValueError("predict() is for classification models; use multiple_choice() or "
                         "sequence_log_likelihood() for a causal LM")
    with quiet():
        examples = _classification_examples(monteclora, data, tokenizer)
        known = tokenizer if tokenizer is not None else getattr(monteclora, "tokenizer", None)
        pad = pad_token_id(known) if known is not None else 0  # pre-tokenized rows without a tokenizer
        predictive = Predictive(monteclora, num_samples, seed, mode, return_samples, vectorize)
        parts = [predictive(batch) for batch in batches(examples, pad, batch_size)]
    return {k: torch.cat([p[k] for p in parts], dim=1 if k == "sample_probs" else 0) for k in parts[0]}
