"""Keep the probability in float32 under mixed precision.

Under ``torch.autocast`` the network runs in bf16/fp16, but the Wishart and Dirichlet draws,
the noise map and the KLs must not: :func:`float32` turns autocast off for a block on the
device of the batch (a no-op when autocast is off).

Example:
    >>> import torch
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     with float32({"input_ids": torch.zeros(1, dtype=torch.long)}):
    ...         (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

__all__ = ["float32"]


def _device_type(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return batch.device.type
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return value.device.type
    return "cpu"


def float32(batch: Any) -> contextlib.AbstractContextManager:
    """A context in which autocast is off on the batch's device (nothing to do if it is off)."""
    device_type = _device_type(batch)
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
