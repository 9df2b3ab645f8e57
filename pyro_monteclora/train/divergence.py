"""Divergence: a non-finite loss term, gradient or parameter stops training with one error.

:class:`DivergenceMonitor` records, on the device and without a host sync, whether any loss
term or gradient was non-finite and at which optimizer step it first happened. :meth:`check`
(called at each log record, before each save and at the end of training: the only places
that read it on the host) raises :class:`TrainingDiverged`, which names the step, the term or
the parameter that went bad, and the usual causes. It also checks that every trainable tensor
is finite and that the variational parameters are inside their support (a concentration or a
scale that overflowed to ``inf`` or underflowed to 0).

Example:
    >>> import torch
    >>> monitor = DivergenceMonitor()
    >>> monitor.record_terms(7, {"nll": torch.tensor(float("nan")), "kl": torch.tensor(0.0)})
    >>> try:
    ...     monitor.check({})
    ... except TrainingDiverged as error:
    ...     print(str(error)[:62])
    training diverged at step 7: the nll term became non-finite; l
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch

__all__ = ["DivergenceMonitor", "TrainingDiverged", "CAUSES"]

CAUSES = "lower learning_rate (try 10x smaller) or sample_scaler (epsilon), keep max_grad_norm on, or check the data"


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite value; nothing from the run was saved after it."""


class DivergenceMonitor:
    """Device-side flags of non-finite loss terms and gradients, read only by :meth:`check`."""

    def __init__(self) -> None:
        self._first: dict[str, torch.Tensor] = {}

    def _flag(self, name: str, step: int, bad: torch.Tensor) -> None:
        current = self._first.get(name)
        step_tensor = torch.full_like(bad, step, dtype=torch.long)
        if current is None:
            current = torch.full_like(bad, -1, dtype=torch.long)
        self._first[name] = torch.where((current < 0) & bad, step_tensor, current)

    def record_terms(self, step: int, terms: Mapping[str, torch.Tensor]) -> None:
        """Note any non-finite loss term (``nll``, ``kl``, ``cooperative``) at ``step``."""
        for name, value in terms.items():
            self._flag(name, step, ~torch.isfinite(value.detach()).all())

    def record_gradients(self, step: int, named_parameters: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        """Note non-finite gradients at ``step``, per parameter (one fused norm per tensor)."""
        names = [n for n, _ in named_parameters]
        present = [(i, p.grad) for i, (_, p) in enumerate(named_parameters) if p.grad is not None]
        if not present:
            return
        norms = torch._foreach_norm([g.detach() for _, g in present])
        finite = torch.isfinite(torch.stack([n.float() for n in norms]))
        bad = torch.zeros(len(names), dtype=torch.bool, device=finite.device)
        bad[torch.tensor([i for i, _ in present], device=finite.device)] = ~finite
        self._flag("gradient", step, bad)
        self._gradient_names = names

    def merge(self, reduce_min: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make this process's record the earliest over all processes, so that all raise together
        (``reduce_min``: an all-reduce taking the element-wise minimum; every process must call it,
        having recorded the same terms, as the trainer's processes do)."""
        never = torch.iinfo(torch.long).max
        for name in sorted(self._first):
            first = self._first[name]
            merged = reduce_min(torch.where(first < 0, torch.full_like(first, never), first))
            self._first[name] = torch.where(merged == never, torch.full_like(merged, -1), merged)

    def check(
        self,
        parameters: Mapping[str, torch.Tensor],
        supports: Optional[Mapping[str, torch.Tensor]] = None,
        step: Optional[int] = None,
    ) -> None:
        """Raise :class:`TrainingDiverged` if a term, gradient or parameter went bad.

        Args:
            parameters: trainable tensors by name (each must be finite).
            supports: variational quantities by name that must be finite and positive
                (concentrations, scales).
            step: the current optimizer step, named in a message about a parameter.
        """
        where = f" by step {step}" if step is not None else ""
        state = self._bad_state(parameters, supports or {})  # a parameter or support that went bad
        detail = f" ({state})" if state else ""
        for name in ("nll", "kl", "cooperative"):
            first = self._first_step(name)
            if first is not None:
                raise TrainingDiverged(
                    f"training diverged at step {first}: the {name} term became non-finite{detail}; {CAUSES}"
                )
        if "gradient" in self._first:
            first = self._first["gradient"]
            bad = (first >= 0).nonzero().flatten().tolist()
            if bad:
                index = min(bad, key=lambda i: int(first[i]))
                raise TrainingDiverged(
                    f"training diverged at step {int(first[index])}: the gradient of {self._gradient_names[index]} "
                    f"became non-finite ({len(bad)} tensor(s) affected); {CAUSES}"
                )
        if state:
            raise TrainingDiverged(f"training diverged{where}: {state}; {CAUSES}")

    @staticmethod
    def _bad_state(parameters: Mapping[str, torch.Tensor], supports: Mapping[str, torch.Tensor]) -> str:
        for name, value in supports.items():  # the variational parameters first: the likelier root cause
            value = value.detach()
            if not (torch.isfinite(value) & (value > 0)).all():
                return (
                    f"{name} left its support (finite and positive; now {float(value.min()):.3g}.."
                    f"{float(value.max()):.3g})"
                )
        for name, value in parameters.items():
            if not torch.isfinite(value.detach()).all():
                return f"parameter {name} became non-finite"
        return ""

    def _first_step(self, name: str) -> Optional[int]:
        value = self._first.get(name)
        if value is None or int(value) < 0:
            return None
        return int(value)
