"""A BLoB-style baseline: a mean-field Gaussian posterior on LoRA's A, trained by backpropagation.

Following BLoB (Wang et al., NeurIPS 2024) and the defaults of its code (bayesian-peft's
``modelwrappers/blob.py``): every ``lora_A`` weight ``M`` gets a standard deviation ``sigma = rho**2``
per element (``rho`` initialized uniformly in ``[eps / sqrt(2), eps]``, ``eps = 0.05``); the
prior is ``N(0, 0.2**2)``; the noise enters by flipout, ``((x * r) @ (sigma * xi)^T * s) @ B^T``
with random signs ``r``, ``s`` per token and ``xi ~ N(0, 1)`` per forward pass; the NLL step uses
the protocol's AdamW, and the KL (closed form, summed over elements) takes a separate SGD step
(learning rate 0.02, the same linear schedule), weighted by BLoB's reweighting
``pi_i = 2**i / (2**(M + 1) - 1)`` over the ``M`` steps of an epoch. At test time every forward
pass draws its own noise; S passes give the predictive.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from peft.tuners.lora import LoraLayer

EPS, PRIOR_STD, KL_LR = 0.05, 0.2, 0.02


class FlipoutA(torch.nn.Module):
    """Holds ``rho`` for one LoRA layer and adds its flipout noise to the layer's output."""

    def __init__(self, layer: LoraLayer, adapter: str = "default") -> None:
        super().__init__()
        weight = layer.lora_A[adapter].weight
        self.rho = torch.nn.Parameter(torch.empty_like(weight).uniform_(EPS / math.sqrt(2), EPS))
        self.adapter, self.sampling = adapter, True
        self.layer = [layer]  # not a submodule: the layer owns us, not the other way round

    def sigma(self) -> torch.Tensor:
        return self.rho**2

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer[0]
        a, b = layer.lora_A[self.adapter], layer.lora_B[self.adapter]
        x = layer.lora_dropout[self.adapter](x.to(a.weight.dtype))
        signs_in = torch.empty(*x.shape[:-1], a.in_features, device=x.device, dtype=x.dtype).uniform_(-1, 1).sign()
        signs_out = torch.empty(*x.shape[:-1], a.out_features, device=x.device, dtype=x.dtype).uniform_(-1, 1).sign()
        perturbation = self.sigma() * torch.randn_like(a.weight)
        return (((x * signs_in) @ perturbation.T) * signs_out) @ b.weight.T * layer.scaling[self.adapter]

    def kl(self) -> torch.Tensor:
        """KL(N(M, sigma^2) || N(0, 0.2^2)) summed over A's elements (closed form, float64)."""
        mean = self.layer[0].lora_A[self.adapter].weight.double()
        sigma = self.sigma().double()
        return (math.log(PRIOR_STD) - torch.log(sigma) + (sigma**2 + mean**2) / (2 * PRIOR_STD**2) - 0.5).sum()


def attach(model: Any) -> list[FlipoutA]:
    """Put a :class:`FlipoutA` on every LoRA linear layer of a peft model (a forward hook adds the noise)."""
    heads = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and "default" in module.lora_A:
            head = FlipoutA(module)
            module.blob = head  # registered as a submodule: rho trains and saves with the model

            def hook(layer, inputs, output, head=head):
                return output + head.noise(inputs[0]).to(output.dtype) if head.sampling else output

            module.register_forward_hook(hook)
            heads.append(head)
    return heads


def set_sampling(heads: list[FlipoutA], on: bool) -> None:
    for head in heads:
        head.sampling = on


def kl_weights(steps_per_epoch: int) -> Callable[[int], float]:
    """BLoB's KL reweighting: step ``i`` of an epoch (1-based, cycling) weighs ``2**i / (2**(M + 1) - 1)``.

    ``M`` is the number of steps per epoch; an epoch's weights sum to about 1 (the full KL once per
    epoch), the late steps weighing most. Python integers keep ``2**M`` exact for any ``M``.
    """
    m = steps_per_epoch

    def weight(step: int) -> float:
        i = m if step % m == 0 else step % m
        return 2**i / (2 ** (m + 1) - 1)

    return weight


def train_steps(model: Any, heads: list[FlipoutA], loader: Any, loss_of: Callable, lr: float,
                schedule: Callable[[int], float], epochs: int, max_grad_norm: float, device: Any = None,
                on_step: Optional[Callable[[Any, int], None]] = None) -> list[dict]:
    """BLoB's two steps per batch: the NLL by AdamW (the protocol's), then the reweighted KL by SGD.

    Both optimizers hold every trainable parameter (A, B and rho) and follow ``schedule``.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    kl_optimizer = torch.optim.SGD(parameters, lr=KL_LR)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (optimizer, kl_optimizer)]
    weight = kl_weights(len(loader))
    history, step = [], 0
    for _ in range(epochs):
        model.train()
        set_sampling(heads, True)
        for batch in loader:
            step += 1
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            nll = loss_of(model, batch)
            optimizer.zero_grad(set_to_none=True)
            nll.backward()
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            kl = sum(head.kl() for head in heads)
            kl_optimizer.zero_grad(set_to_none=True)
            (kl * weight(step)).float().backward()
            kl_optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            history.append({"step": step, "nll": float(nll.detach()), "kl": float(kl.detach())})
            if on_step is not None:
                on_step(model, step)
    model.eval()
    return history
