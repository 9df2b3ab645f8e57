"""The adapter drawn for one training step, held until that step's backward pass has run.

Activation checkpointing runs a block's forward pass a second time during the backward pass.
That recompute must see exactly the adapter drawn for the step: not the mean (an empty noise
slot), not a new draw. :class:`HeldDraw` keeps each group's noise in its slot from the forward
pass until :meth:`HeldDraw.release`, and hands the layers a detached *leaf* copy of it:

- the layers' gradients (from the first pass, or from the recompute, reentrant or not)
  accumulate in ``leaf.grad``;
- :meth:`HeldDraw.backward_to_guide` then applies the chain rule from the leaves to the
  variational parameters (``d loss / d phi = (d noise / d phi)^T leaf.grad``), together with
  the gradient of the step's regularizer (the KL and the cooperative loss, which share graph
  nodes with the noise, such as the Dirichlet draw), in one pass, and adds it to their
  ``.grad``, averaged over processes like DDP's own reduction.

Reentrant checkpointing does not follow a tensor that a block reads from a module attribute
(pytorch#81296), and the recompute of one block must not free the graph of the noise that the
other blocks share; the leaf makes both cases the plain case. The same path serves steps
without checkpointing, so there is one mechanism.

Example:
    >>> import torch
    >>> from pyro_monteclora.layers import LayerGroup
    >>> group = LayerGroup("d2", 2, 1, ("layer",))
    >>> phi = torch.tensor(2.0, requires_grad=True)
    >>> hold = HeldDraw((group,))
    >>> noise = hold.take({"d2": phi * torch.ones(1, 1, 2)})["d2"]   # what the layers read
    >>> group.slot.value is noise and noise.is_leaf
    True
    >>> (3 * noise).sum().backward()                          # the network's backward
    >>> hold.backward_to_guide([phi]); hold.release()
    >>> float(phi.grad), group.slot.value
    (6.0, None)
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch

from ..layers import LayerGroup

__all__ = ["HeldDraw"]


class HeldDraw:
    """Holds one step's noise in the layer groups' slots across its forward and backward pass.

    Args:
        groups: the layer groups whose slots receive the noise.
    """

    def __init__(self, groups: Sequence[LayerGroup]) -> None:
        self.groups = tuple(groups)
        self.noise: dict[str, torch.Tensor] = {}
        self.leaves: dict[str, torch.Tensor] = {}
        self.regularizer: Optional[torch.Tensor] = None

    def take(self, noise: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fill the slots with leaf copies of ``noise`` (kept until :meth:`release`); returns them."""
        if self.noise:
            raise RuntimeError("this HeldDraw already holds a draw; release() it before the next step")
        self.noise = dict(noise)
        self.leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in self.noise.items()}
        for group in self.groups:
            group.slot.value = self.leaves[group.name]
        return dict(self.leaves)

    def hold_regularizer(self, regularizer: torch.Tensor) -> None:
        """Keep the step's guide-only loss term (graph attached) for :meth:`backward_to_guide`."""
        self.regularizer = regularizer

    def backward_to_guide(
        self,
        parameters: Sequence[torch.nn.Parameter],
        average: Optional[Callable[[list[torch.Tensor]], list[torch.Tensor]]] = None,
    ) -> None:
        """Add ``(d noise / d parameters)^T leaf.grad + d regularizer / d parameters`` to ``.grad``.

        ``average`` (for several processes) maps the local gradients to their mean over
        processes, as DDP does for every other gradient. Leaves that received no gradient
        (the network did not use them) contribute nothing.
        """
        pairs = [(self.noise[k], leaf.grad) for k, leaf in self.leaves.items() if leaf.grad is not None]
        pairs = [(n, g) for n, g in pairs if n.requires_grad]
        if self.regularizer is not None and self.regularizer.requires_grad:
            pairs.append((self.regularizer, torch.ones_like(self.regularizer)))
        wanted = [p for p in parameters if p.requires_grad]
        if not pairs or not wanted:
            return
        grads = torch.autograd.grad(
            [n for n, _ in pairs], wanted, grad_outputs=[g for _, g in pairs], allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(wanted, grads)]
        if average is not None:
            grads = average(grads)
        for p, g in zip(wanted, grads):
            p.grad = g if p.grad is None else p.grad.add_(g)

    def release(self) -> None:
        """Empty the slots (the layers are the mean adapter again) and drop the draw."""
        for group in self.groups:
            group.slot.value = None
        self.noise, self.leaves, self.regularizer = {}, {}, None
