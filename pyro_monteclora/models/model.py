"""The MonteCLoRA Pyro model: priors on every layer group, the adapted network, the likelihood.

``MonteCLoRAModel(batch, dataset_size)`` samples each group's latents from the prior (or takes
them from a guide under ``poutine.replay``), turns them into noise on the LoRA factors A, runs
the real transformer forward pass with ``A~ = A + noise`` and observes the labels. It returns
the logits. A, B and the task head are parameters of the network (point estimates); the base
weights are frozen by peft.

Example:
    >>> import pyro, torch
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert
    >>> mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    >>> batch = {"input_ids": torch.tensor([[1, 5, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
    ...          "labels": torch.tensor([1])}
    >>> trace = pyro.poutine.trace(mc.model).get_trace(batch, dataset_size=100)
    >>> [name for name in trace.stochastic_nodes if not name.endswith("layers") and name != "data"]
    ['d16.covariance_tril', 'd16.weights', 'd16.components', 'd32.covariance_tril', 'd32.weights', 'd32.components']
    >>> trace.observation_nodes
    ['obs']
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..config import MonteCLoRAConfig
from ..layers import LayerGroup, StochasticLoraA, noise_context
from .choices import choice_log_likelihoods, choice_logits, is_choice_batch
from .choices import supports_logits_to_keep
from .likelihood import causal_lm_likelihood, classification_likelihood, target_positions
from .noise import adapter_noise
from .precision import float32
from .prior import GroupPrior

__all__ = ["MonteCLoRAModel", "NON_INPUT_KEYS", "supports_logits_to_keep"]

NON_INPUT_KEYS = ("labels", "index")


class MonteCLoRAModel(nn.Module):
    """The generative model of a MonteCLoRA fine-tune (a Pyro model as an ``nn.Module``).

    Args:
        network: the peft-wrapped transformers model whose ``lora_A`` layers read noise from
            the ``groups``' slots.
        groups: the layer groups (see :func:`pyro_monteclora.layers.attach_lora`).
        config: supplies N, epsilon, the Wishart df, alpha0 and whether components collapse.
        task: ``"classification"`` or ``"causal_lm"``.
    """

    def __init__(
        self, network: nn.Module, groups: tuple[LayerGroup, ...], config: MonteCLoRAConfig, task: str
    ) -> None:
        super().__init__()
        self.network = network
        self.groups = groups
        self.task = task
        self.sample_scaler = config.sample_scaler
        self.collapsed = config.collapse_components
        self.choice_score = config.choice_score
        self.priors = nn.ModuleDict(
            {
                g.name: GroupPrior(
                    g,
                    config.num_components,
                    config.prior_wishart_df,
                    config.dirichlet_concentration,
                    config.collapse_components,
                )
                for g in groups
            }
        )
        self.likelihood = classification_likelihood if task == "classification" else causal_lm_likelihood
        #: The ``"learned"`` variant's column widths, ``{group: (layers, d)}``, read from the guide at
        #: every draw (set by :class:`~pyro_monteclora.MonteCLoRA`); ``None``: the paper's fixed epsilon.
        self.widths: Optional[Callable[[], Optional[dict[str, torch.Tensor]]]] = None

    def noise(self, latents: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Noise on A per group from ``{group: (covariance_tril, weights, components)}``.

        Scaled by epsilon, or column by column by the guide's widths in the ``"learned"`` variant.
        """
        widths = self.widths() if self.widths is not None else None
        return {
            name: adapter_noise(
                tril, weights, components,
                self.sample_scaler if widths is None else widths[name].to(tril.dtype).unsqueeze(-2), self.collapsed,
            )
            for name, (tril, weights, components) in latents.items()
        }

    def forward(
        self, batch: Mapping[str, torch.Tensor], dataset_size: Optional[int] = None, hold: Optional[Any] = None
    ) -> torch.Tensor:
        """Sample the latents, run the network with ``A~ = A + noise``, observe the labels.

        With ``hold`` (a :class:`~pyro_monteclora.train.draw.HeldDraw`), the noise stays in the
        layers' slots after this call, until the caller's backward pass has run (training with
        activation checkpointing); without it, the slots are emptied on return.
        """
        latents = {name: prior() for name, prior in self.priors.items()}
        if is_choice_batch(batch):
            return self._choices(batch, latents, dataset_size, hold)
        inputs = {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}
        labels = batch.get("labels")
        positions = None
        if self.task == "causal_lm" and labels is not None and self.logits_on_targets:
            positions = target_positions(labels)  # the LM head runs on the answer positions only
            if positions[0].shape[1] < labels.shape[1] - 1:
                inputs["logits_to_keep"] = positions[0]
            else:  # every position is scored: gathering them would only copy the hidden states
                positions = None
        with float32(batch):
            noise = self.noise(latents)
        if hold is not None:
            hold.take(noise)
            logits = self.network(**inputs).logits
        else:
            with noise_context(self.groups, noise):
                logits = self.network(**inputs).logits
        if positions is not None:
            self.likelihood(logits, labels, dataset_size, batch.get("index"), positions)
        else:
            self.likelihood(logits, labels, dataset_size, batch.get("index"))
        return logits

    def _choices(self, batch: Mapping[str, torch.Tensor], latents: dict, dataset_size: Optional[int],
                 hold: Optional[Any]) -> torch.Tensor:
        """The multiple-choice likelihood (:mod:`.choices`): the label from a Categorical over the
        choices' continuation log-likelihoods under the drawn adapter; returns its logits ``(rows, K)``."""
        with float32(batch["choice_ids"]):
            noise = self.noise(latents)
        if hold is not None:
            hold.take(noise)
            scores = choice_log_likelihoods(self.network, batch)[0][0]
        else:
            with noise_context(self.groups, noise):
                scores = choice_log_likelihoods(self.network, batch)[0][0]
        logits = choice_logits(scores, batch, self.choice_score)
        classification_likelihood(logits, batch.get("labels"), dataset_size, batch.get("index"))
        return logits

    def lora_a(self) -> dict[str, torch.Tensor]:
        """Each group's mean factors A, ``(layers, r, d)`` in group order (with their graph)."""
        return {name: torch.stack([m.weight for m in modules]) for name, modules in self.lora_a_modules.items()}

    @functools.cached_property
    def lora_a_modules(self) -> dict[str, list[nn.Module]]:
        """Each group's ``lora_A`` layers in group order (found once through their noise slots)."""
        found: dict[str, list] = {g.name: [None] * g.num_layers for g in self.groups}
        by_slot = {id(g.slot): g.name for g in self.groups}
        for module in self.network.modules():
            if isinstance(module, StochasticLoraA) and id(module.noise_slot) in by_slot:
                found[by_slot[id(module.noise_slot)]][module.noise_index] = module
        missing = [name for name, modules in found.items() if any(m is None for m in modules)]
        if missing:
            raise ValueError(f"the network lacks lora_A layers of group(s) {missing}: was the adapter merged or removed?")
        return found

    @functools.cached_property
    def logits_on_targets(self) -> bool:
        """Whether the network takes per-sequence ``logits_to_keep`` positions (transformers >= 5)."""
        return supports_logits_to_keep(self.network)
