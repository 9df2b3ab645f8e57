"""The MonteCLoRA training objective as an ``nn.Module`` loss: negative ELBO + cooperative loss.

``ELBOLoss(batch, dataset_size)`` traces the guide, replays the model on the guide's draws and
returns :class:`LossTerms`, all *per training example* (divided by ``dataset_size``)::

    nll          = -E_q[log p(data | A~)]           (one draw; minibatch scaled to the dataset)
    kl           = sum over latent sites of KL(q || p)   (analytic: Wishart, Dirichlet, N(0, 1)),
                   plus, with the column prior or the "learned" variant, the KL of A~'s columns at the
                   draw's (Sigma, pi) (models/column_prior.py, models/width.py)
    cooperative  = mean over adapted layers of sum_k pi_k^2    (pi drawn from the guide)
    loss         = (nll + kl_weight * kl) + cooperative_weight * cooperative

With ``kl_weight = 1``, ``nll + kl`` is ``TraceMeanField_ELBO().differentiable_loss(model, guide,
...) / dataset_size`` on the same draws (a test checks it); computing the terms from the traces
directly gives the parts for logging in the same single pass.

Example:
    >>> import torch
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert
    >>> mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    >>> batch = {"input_ids": torch.tensor([[1, 5, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
    ...          "labels": torch.tensor([1])}
    >>> terms = ELBOLoss(mc.model, mc.guide)(batch, dataset_size=10)
    >>> float(terms.kl)          # the guide starts at the prior
    0.0
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch
from torch import nn
from torch.distributions import kl_divergence

from ..models.column_prior import column_prior_kl
from ..models.width import width_kl
from ..models.precision import float32

__all__ = ["ELBOLoss", "LossTerms", "cooperative_loss"]


@dataclass
class LossTerms:
    """One step's objective and its parts, per training example (tensors, graph attached)."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    cooperative: torch.Tensor

    def detached(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in vars(self).items()}


def cooperative_loss(weights: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``sum_k pi_k^2`` for mixture weights ``(..., layers, N)`` per group.

    It lies in ``[1/N, 1]`` and is smallest when every component carries the same weight.
    """
    per_layer = torch.cat([(w**2).sum(-1).reshape(-1) for w in weights])
    return per_layer.mean()


class ELBOLoss(nn.Module):
    """Negative ELBO per example plus the cooperative loss, over a Pyro model and guide.

    Args:
        model: the Pyro model (signature ``(batch, dataset_size)``).
        guide: the guide with the same signature.
        kl_weight: multiplies the KL; 1 is the exact ELBO.
        cooperative_weight: multiplies the cooperative loss.
        weight_sites: names of the guide's mixture-weight sites (default: those ending ``.weights``).
        column_prior: add the KL of the prior on A~'s columns
            (:mod:`pyro_monteclora.models.column_prior`) to ``kl``; needs a
            :class:`~pyro_monteclora.models.model.MonteCLoRAModel`.
        prior_std: the ``"learned"`` variant (:mod:`pyro_monteclora.models.width`): add the KL of
            ``A~`` (its columns' widths from the guide) to the prior ``N(0, prior_std^2)``.
    """

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        kl_weight: float = 1.0,
        cooperative_weight: float = 1.0,
        weight_sites: Optional[tuple[str, ...]] = None,
        column_prior: bool = False,
        prior_std: Optional[float] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.guide = guide
        self.kl_weight = kl_weight
        self.cooperative_weight = cooperative_weight
        self.weight_sites = weight_sites
        self.column_prior = column_prior
        self.prior_std = prior_std

    def forward(self, batch: Mapping[str, torch.Tensor], dataset_size: int, hold: Optional[Any] = None) -> LossTerms:
        """The terms for one minibatch and one draw.

        The guide's draws and the KLs are computed in float32 even under autocast; only the
        network runs in mixed precision. With ``hold`` (a
        :class:`~pyro_monteclora.train.draw.HeldDraw`), the draw stays in the layers until the
        caller's backward pass has run, and the guide's side is computed without a graph:
        only ``nll`` carries one (to A, B, the head and the held noise), and the variational
        gradient comes from :meth:`guide_terms`, redrawn with the same random state.
        """
        no_graph = torch.no_grad() if hold is not None else contextlib.nullcontext()
        if hold is not None:
            hold.capture_rng(_device_of(batch))
        with float32(batch), no_graph:
            guide_trace = poutine.trace(self.guide).get_trace(batch, dataset_size, hold)
        model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(batch, dataset_size, hold)
        model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        log_likelihood = sum(site["log_prob_sum"] for site in _sample_sites(model_trace) if site["is_observed"])
        nll = -log_likelihood / dataset_size
        with float32(batch), no_graph:
            kl, cooperative = self._guide_parts(guide_trace, model_trace, dataset_size, nll)
        loss = nll + self.kl_weight * kl + self.cooperative_weight * cooperative
        return LossTerms(loss=loss, nll=nll, kl=kl, cooperative=cooperative)

    def guide_terms(self, dataset_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One draw from the guide, with its graph: ``(noise per group, kl, cooperative)``.

        With the random state restored to the one before :meth:`forward`'s draw, the values
        equal that draw's (the test suite checks it), so back-propagating the held noise's
        gradient through this noise is the exact chain rule, without keeping the draw's graph
        alive during the network's backward pass. Needs a :class:`MonteCLoRAModel` (its
        ``priors`` and ``noise``).
        """
        reference = next(self.guide.parameters())
        with float32(reference):
            guide_trace = poutine.trace(self.guide).get_trace(None, dataset_size)
            priors = poutine.trace(poutine.replay(self._sample_priors, trace=guide_trace))
            latents = priors()
            noise = self.model.noise(latents)
            kl, cooperative = self._guide_parts(guide_trace, priors.trace, dataset_size, reference)
        return noise, kl, cooperative

    def _sample_priors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return {name: prior() for name, prior in self.model.priors.items()}

    def _guide_parts(
        self, guide_trace: poutine.Trace, prior_trace: poutine.Trace, dataset_size: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(q || p) per example over the latent sites, and the cooperative loss of the draw."""
        kl = 0.0
        weights = []
        for name, site in _sample_sites(guide_trace, named=True):
            kl = kl + site["scale"] * kl_divergence(site["fn"], prior_trace.nodes[name]["fn"]).sum()
            if (self.weight_sites is None and name.endswith(".weights")) or (
                self.weight_sites is not None and name in self.weight_sites
            ):
                weights.append(site["value"])
        if self.column_prior or self.prior_std is not None:
            kl = kl + self._column_kl(guide_trace)
        kl = torch.as_tensor(kl, device=like.device, dtype=torch.float32) / dataset_size
        cooperative = cooperative_loss(weights) if weights else torch.zeros_like(kl)
        return kl, cooperative


    def column_parameters(self) -> list[torch.nn.Parameter]:
        """The tensors the column KL (column prior or learned width) reaches besides the guide's: the A factors."""
        if not self.column_prior and self.prior_std is None:
            return []
        return [m.weight for modules in self.model.lora_a_modules.values() for m in modules]

    def _column_kl(self, guide_trace: poutine.Trace) -> torch.Tensor:
        """The KL of A~'s columns summed over every layer, at the guide trace's (Sigma, pi)."""
        means = self.model.lora_a()
        widths = self.guide.widths() if self.prior_std is not None else None
        total = 0.0
        for name, prior in self.model.priors.items():
            tril = guide_trace.nodes[prior.names["covariance"]]["value"]
            weights = guide_trace.nodes[prior.names["weights"]]["value"]
            if widths is not None:
                total = total + width_kl(means[name], tril, weights, widths[name], self.prior_std).sum()
            else:
                total = total + column_prior_kl(means[name], tril, weights, self.model.sample_scaler).sum()
        return total


def _device_of(batch: Mapping[str, torch.Tensor]) -> torch.device:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _sample_sites(trace: poutine.Trace, named: bool = False):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield (name, site) if named else site
