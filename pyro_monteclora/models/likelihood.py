"""Likelihoods of the task data given the adapted network's logits.

Both put the observations in ``pyro.plate("data", size=dataset_size, subsample=indices)``, so a
minibatch's log-likelihood is scaled by ``dataset_size / batch_size`` and the ELBO of a minibatch
estimates the ELBO of the whole dataset.

Example:
    >>> import torch, pyro
    >>> logits = torch.zeros(4, 3)
    >>> trace = pyro.poutine.trace(classification_likelihood).get_trace(
    ...     logits, torch.tensor([0, 1, 2, 0]), dataset_size=8, subsample=torch.arange(4))
    >>> round(float(trace.log_prob_sum()), 4)   # 8 * log(1/3), scaled from 4 examples
    -8.7889
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

__all__ = [
    "classification_likelihood",
    "causal_lm_likelihood",
    "target_positions",
    "IGNORE_INDEX",
    "OBSERVATION_SITE",
]

IGNORE_INDEX = -100
OBSERVATION_SITE = "obs"


def _plate(batch_size: int, dataset_size: Optional[int], subsample: Optional[torch.Tensor], device):
    if dataset_size is None:
        return pyro.plate("data", batch_size, dim=-1)
    if subsample is None:
        subsample = torch.arange(batch_size, device=device)
    return pyro.plate("data", size=dataset_size, subsample=subsample, dim=-1)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def classification_likelihood(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    dataset_size: Optional[int] = None,
    subsample: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``labels[i] ~ Categorical(logits[i])`` for a batch of ``(batch, classes)`` logits.

    Half-precision logits are upcast to float32 before normalization.
    """
    logits = _upcast(logits)
    with _plate(logits.shape[0], dataset_size, subsample, logits.device):
        return pyro.sample(OBSERVATION_SITE, dist.Categorical(logits=logits), obs=labels)


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits a causal LM's loss needs, per sequence, and which are real.

    Position ``t`` of a sequence predicts token ``t + 1``; it is needed where
    ``labels[:, t + 1] != IGNORE_INDEX`` (the answer tokens). Returns ``positions`` and ``valid``,
    both ``(batch, K)`` with ``K`` the largest count in the batch; rows with fewer positions are
    padded with position 0 and ``valid = False``. Passing ``positions`` as transformers'
    ``logits_to_keep`` computes the LM head on those positions only.

    Example:
        >>> labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
        >>> positions, valid = target_positions(labels)
        >>> positions.tolist(), valid.tolist()
        ([[1, 2], [0, 0]], [[True, True], [True, False]])
    """
    needed = labels[:, 1:] != IGNORE_INDEX
    counts = needed.sum(1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    order = torch.sort((~needed).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=labels.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def causal_lm_likelihood(
    logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    dataset_size: Optional[int] = None,
    subsample: Optional[torch.Tensor] = None,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> Optional[torch.Tensor]:
    """Each sequence's next tokens ``~ Categorical(logits)``, over positions whose label is kept.

    ``labels`` are ``(batch, length)`` token ids aligned with the inputs, ``IGNORE_INDEX`` on
    prompt and padding positions (as in transformers); position ``t`` is predicted from ``t - 1``.
    A sequence is one observation (its tokens are its event), so the plate counts sequences.
    Half-precision logits are upcast to float32 before normalization.

    With ``positions`` (from :func:`target_positions`), ``logits`` are ``(batch, K, vocab)``:
    those positions only, as computed with ``logits_to_keep``. The log-likelihood is the same.
    Given full logits and ``labels``, the positions the labels keep are gathered first, so only
    they are normalized (the same log-likelihood; a distribution over every position of a 49k
    vocabulary would cost as much as the network's whole LM head again).
    """
    if positions is None and labels is not None:
        positions = target_positions(labels)
        where = positions[0]
        logits = logits.gather(1, where[..., None].expand(*where.shape, logits.shape[-1]))
    if positions is not None and labels is not None:
        where, valid = positions
        targets = labels.gather(1, where + 1)
        with _plate(logits.shape[0], dataset_size, subsample, logits.device):
            return pyro.sample(
                OBSERVATION_SITE,
                dist.Categorical(logits=_upcast(logits)).mask(valid).to_event(1),
                obs=torch.where(valid, targets, torch.zeros_like(targets)),
            )
    with _plate(logits.shape[0], dataset_size, subsample, logits.device):  # no labels: the model generates
        return pyro.sample(OBSERVATION_SITE, dist.Categorical(logits=_upcast(logits[:, :-1])).to_event(1))
