"""The MonteCLoRA variational guide: the model's latent sites with learnable parameters.

Per layer (batched over each group's plate):

- covariance: ``WishartCholesky(df, diag(v)^(1/2))``: a Wishart with the prior's degrees of
  freedom and a learnable diagonal scale ``v`` (r numbers, initialized to the prior's 1s);
- mixture weights: ``Dirichlet(alpha)`` with learnable concentrations (N numbers, initialized
  to the prior's alpha0);
- Gaussian components: the model's own conditional ``z_k | Sigma ~ N(0, Sigma)``, written
  non-centered (``xi ~ N(0, 1)`` in both model and guide, so their KL is exactly 0).

The guide therefore starts at the prior (KL = 0) and adds ``r + N`` parameters per layer, the
O(r + N) of the paper. Parameters are ordinary ``nn.Parameter``s of this module (unconstrained
logs), never entries of Pyro's global param store.

Example:
    >>> import pyro
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert
    >>> mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    >>> sum(p.numel() for p in mc.guide.parameters()) == 7 * (4 + 4)   # 7 layers * (r + N)
    True
    >>> trace = pyro.poutine.trace(mc.guide).get_trace({}, dataset_size=10)
    >>> trace.nodes["d16.weights"]["value"].shape
    torch.Size([6, 4])
"""

from __future__ import annotations

import math
from typing import Any, Optional

import pyro.distributions as dist
import torch
from torch import nn

from ..config import MonteCLoRAConfig
from ..distributions import StandardNormal, WishartCholesky
from ..layers import LayerGroup
from ..models.prior import component_shape, sample_group, site_names

__all__ = ["MonteCLoRAGuide", "GroupPosterior"]


class GroupPosterior(nn.Module):
    """Variational parameters and sample sites of one layer group."""

    def __init__(self, group: LayerGroup, config: MonteCLoRAConfig) -> None:
        super().__init__()
        self.group = group
        self.names = site_names(group)
        self.component_shape = component_shape(group, config.num_components, config.collapse_components)
        layers = group.num_layers
        self.register_buffer("df", torch.tensor(config.prior_wishart_df), persistent=False)
        self.log_scale_diag = nn.Parameter(torch.zeros(layers, group.rank))
        self.log_concentration = nn.Parameter(
            torch.full((layers, config.num_components), math.log(config.dirichlet_concentration))
        )
        if config.variant == "learned":  # the columns' widths w (models/width.py), started at epsilon
            self.log_width = nn.Parameter(torch.full((layers, group.in_features), math.log(config.sample_scaler)))

    @property
    def scale_diag(self) -> torch.Tensor:
        """Diagonal ``v`` of the Wishart scale matrix, ``(layers, r)``."""
        return self.log_scale_diag.exp()

    @property
    def width(self) -> "torch.Tensor | None":
        """The columns' widths ``w``, ``(layers, d)``, of the ``"learned"`` variant (``None``: the paper's)."""
        return self.log_width.exp() if hasattr(self, "log_width") else None

    @property
    def concentration(self) -> torch.Tensor:
        """Dirichlet concentrations ``alpha``, ``(layers, N)``."""
        return self.log_concentration.exp()

    def distributions(self) -> tuple[WishartCholesky, dist.Dirichlet, StandardNormal]:
        """The variational laws of the three sites, batched over the group's layers."""
        layers = torch.Size((self.group.num_layers,))
        tril = torch.diag_embed((0.5 * self.log_scale_diag).exp())
        return (
            WishartCholesky(self.df.expand(layers), tril),
            dist.Dirichlet(self.concentration),
            StandardNormal(layers, self.component_shape, tril.dtype, tril.device),
        )

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sample_group(self.group, self.distributions())


class MonteCLoRAGuide(nn.Module):
    """Mean-field guide over all layer groups; same signature as :class:`MonteCLoRAModel`."""

    def __init__(self, groups: tuple[LayerGroup, ...], config: MonteCLoRAConfig) -> None:
        super().__init__()
        self.posteriors = nn.ModuleDict({g.name: GroupPosterior(g, config) for g in groups})

    def forward(self, batch: Any = None, dataset_size: Optional[int] = None, hold: Any = None) -> dict[str, tuple]:
        return {name: posterior() for name, posterior in self.posteriors.items()}

    def widths(self) -> Optional[dict[str, torch.Tensor]]:
        """Each group's column widths (the ``"learned"`` variant), or ``None`` (the paper's fixed epsilon)."""
        found = {name: posterior.width for name, posterior in self.posteriors.items()}
        return None if any(w is None for w in found.values()) else found
