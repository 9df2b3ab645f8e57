"""The adapter drawn for one training step, held until that step's backward pass has run.

Activation checkpointing runs a block's forward pass a second time during the backward pass.
That recompute must see exactly the adapter drawn for the step: not the mean (an empty noise
slot), not a new draw. :class:`HeldDraw` keeps each group's noise in its slot from the forward
pass until :meth:`HeldDraw.release`, as a *leaf* tensor without a graph:

- the layers' gradients (from the first pass, or from the recompute, reentrant or not)
  accumulate in ``leaf.grad``;
- :meth:`HeldDraw.backward_to_guide` then redraws the same adapter from the guide, with its
  graph, from the random state captured before the forward draw (:meth:`capture_rng`), and
  applies the chain rule ``d loss / d phi = (d noise / d phi)^T leaf.grad`` together with the
  gradient of the step's regularizer (KL and cooperative loss, which share graph nodes with
  the draw) in one pass, averaged over processes like DDP's own reduction.

Reentrant checkpointing does not follow a tensor that a block reads from a module attribute
(pytorch#81296), and one block's recompute must not free the graph of the noise that the
other blocks share; the leaf makes both cases the plain case. Redrawing instead of keeping the
draw's graph means the step holds only the noise values (one LoRA-A-sized tensor per layer)
during the network's backward pass, not the N Gaussian components behind them. The same path
serves steps without checkpointing, so there is one mechanism.

Example:
    >>> import torch
    >>> from pyro_monteclora.layers import LayerGroup
    >>> group = LayerGroup("d2", 2, 1, ("layer",))
    >>> phi = torch.tensor(2.0, requires_grad=True)
    >>> def draw():                                   # the guide: noise = phi * xi, xi ~ N(0, 1)
    ...     return {"d2": phi * torch.randn(1, 1, 2)}, (phi - 1) ** 2   # noise, regularizer
    >>> hold = HeldDraw((group,))
    >>> hold.capture_rng(torch.device("cpu"))
    >>> with torch.no_grad():
    ...     noise = hold.take(draw()[0])["d2"]          # what the layers read: a leaf, no graph
    >>> hold.remember(draw)
    >>> (3 * noise).sum().backward()                  # the network's backward pass
    >>> hold.backward_to_guide([phi]); hold.release()
    >>> bool(torch.isclose(phi.grad, 3 * noise.sum() / phi + 2 * (phi - 1)))
    True
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch

from ..layers import LayerGroup

__all__ = ["HeldDraw"]

Redraw = Callable[[], tuple[Mapping[str, torch.Tensor], torch.Tensor]]


class HeldDraw:
    """Holds one step's noise in the layer groups' slots across its forward and backward pass.

    Args:
        groups: the layer groups whose slots receive the noise.
    """

    def __init__(self, groups: Sequence[LayerGroup]) -> None:
        self.groups = tuple(groups)
        self.leaves: dict[str, torch.Tensor] = {}
        self.redraw: Optional[Redraw] = None
        self._rng: Optional[tuple[torch.device, torch.Tensor, Optional[torch.Tensor]]] = None

    def capture_rng(self, device: torch.device) -> None:
        """Remember the random state the draw is about to be made from."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self._rng = (device, torch.get_rng_state(), cuda)

    def take(self, noise: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fill the slots with leaf copies of ``noise`` (kept until :meth:`release`); returns them."""
        if self.leaves:
            raise RuntimeError("this HeldDraw already holds a draw; release() it before the next step")
        self.leaves = {k: v.detach().requires_grad_(True) for k, v in noise.items()}
        for group in self.groups:
            group.slot.value = self.leaves[group.name]
        return dict(self.leaves)

    def remember(self, redraw: Redraw) -> None:
        """How to redraw the held noise with its graph: a callable returning ``(noise, regularizer)``."""
        self.redraw = redraw

    def backward_to_guide(
        self,
        parameters: Sequence[torch.nn.Parameter],
        average: Optional[Callable[[list[torch.Tensor]], list[torch.Tensor]]] = None,
    ) -> None:
        """Add ``(d noise / d parameters)^T leaf.grad + d regularizer / d parameters`` to ``.grad``.

        The noise and the regularizer come from :meth:`remember`'s callable, run with the random
        state of :meth:`capture_rng` (and the caller's state restored afterwards). ``average``
        (several processes) maps the local gradients to their mean over processes.
        """
        wanted = [p for p in parameters if p.requires_grad]
        if self.redraw is None or not wanted:
            return
        noise, regularizer = self._redraw()
        pairs = [(noise[k], leaf.grad) for k, leaf in self.leaves.items() if leaf.grad is not None]
        pairs = [(n, g) for n, g in pairs if n.requires_grad]
        if regularizer.requires_grad:
            pairs.append((regularizer, torch.ones_like(regularizer)))
        if not pairs:
            return
        grads = torch.autograd.grad(
            [n for n, _ in pairs], wanted, grad_outputs=[g for _, g in pairs], allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(wanted, grads)]
        if average is not None:
            grads = average(grads)
        for p, g in zip(wanted, grads):
            p.grad = g if p.grad is None else p.grad.add_(g)

    def _redraw(self) -> tuple[Mapping[str, torch.Tensor], torch.Tensor]:
        if self._rng is None:
            return self.redraw()
        device, cpu, cuda = self._rng
        devices = [device] if cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)
            return self.redraw()

    def release(self) -> None:
        """Empty the slots (the layers are the mean adapter again) and drop the draw."""
        for group in self.groups:
            group.slot.value = None
        self.leaves, self.redraw, self._rng = {}, None, None
