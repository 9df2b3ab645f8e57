"""The prior of a layer group's latent variables and its Pyro sample sites.

For a group of ``L`` equally shaped layers (rank r, input width d) and N components, inside
``pyro.plate("<group>.layers", L)``:

- ``<group>.covariance_tril`` ~ WishartCholesky(df, I_r): the Cholesky factor of
  ``Sigma ~ Wishart(df, I_r)``;
- ``<group>.weights`` ~ Dirichlet(alpha0 * 1_N): the mixture weights ``pi``;
- ``<group>.components`` ~ N(0, 1) of shape ``(N, d, r)``: ``z_k = L xi_k ~ N(0, Sigma)``
  for each component and column (non-centered).

Example:
    >>> import pyro
    >>> from pyro_monteclora.layers import LayerGroup
    >>> prior = GroupPrior(LayerGroup("d8", 8, 2, ("a", "b")), num_components=3,
    ...                    df=2.0, concentration=1.0, collapsed=False)
    >>> latents = prior()
    >>> [tuple(v.shape) for v in latents]
    [(2, 2, 2), (2, 3), (2, 3, 8, 2)]
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import StandardNormal, WishartCholesky
from ..layers import LayerGroup

__all__ = ["GroupPrior", "site_names", "sample_group", "component_shape"]


def site_names(group: LayerGroup) -> dict[str, str]:
    """The names of a group's plate and sample sites."""
    return {
        "plate": f"{group.name}.layers",
        "covariance": f"{group.name}.covariance_tril",
        "weights": f"{group.name}.weights",
        "components": f"{group.name}.components",
    }


def component_shape(group: LayerGroup, num_components: int, collapsed: bool) -> torch.Size:
    """Event shape of the components site: ``(N, d, r)``, or ``(d, r)`` when collapsed."""
    per_column = (group.in_features, group.rank)
    return torch.Size(per_column if collapsed else (num_components,) + per_column)


class GroupPrior(nn.Module):
    """Samples one group's latents from the prior; constants are (non-persistent) buffers."""

    def __init__(
        self, group: LayerGroup, num_components: int, df: float, concentration: float, collapsed: bool
    ) -> None:
        super().__init__()
        self.group = group
        self.names = site_names(group)
        self.component_shape = component_shape(group, num_components, collapsed)
        self.register_buffer("df", torch.tensor(float(df)), persistent=False)
        self.register_buffer("scale_tril", torch.eye(group.rank), persistent=False)
        self.register_buffer("concentration", torch.full((num_components,), float(concentration)), persistent=False)

    def distributions(self) -> tuple[WishartCholesky, dist.Dirichlet, StandardNormal]:
        """The prior laws of the three sites, batched over the group's layers."""
        layers = torch.Size((self.group.num_layers,))
        r = self.group.rank
        return (
            WishartCholesky(self.df.expand(layers), self.scale_tril.expand(layers + (r, r))),
            dist.Dirichlet(self.concentration.expand(layers + self.concentration.shape)),
            StandardNormal(layers, self.component_shape, self.scale_tril.dtype, self.scale_tril.device),
        )

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sample_group(self.group, self.distributions())


def sample_group(group: LayerGroup, distributions: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The group's three sites (covariance, weights, components) under its plate over layers.

    The one place the sites are written: the prior (:class:`GroupPrior`) and the guide
    (:class:`~pyro_monteclora.guides.GroupPosterior`) pass their own distributions.
    """
    names = site_names(group)
    covariance, weights, components = distributions
    with pyro.plate(names["plate"], group.num_layers, dim=-1):
        return (
            pyro.sample(names["covariance"], covariance),
            pyro.sample(names["weights"], weights),
            pyro.sample(names["components"], components),
        )
