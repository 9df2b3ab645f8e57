"""Training checkpoints: find the newest complete ``checkpoint-<step>`` and restore its state.

A checkpoint folder is complete once Trainer has written ``trainer_state.json`` into it (the
last file of a checkpoint, after the adapter files, optimizer, scheduler and random states);
a folder without it is a write that was interrupted and is skipped when resuming.

Example:
    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> for step, complete in ((2, True), (4, True), (6, False)):
    ...     os.makedirs(f"{root}/checkpoint-{step}")
    ...     if complete:
    ...         _ = open(f"{root}/checkpoint-{step}/trainer_state.json", "w").write("{}")
    ...         open(f"{root}/checkpoint-{step}/monteclora_config.json", "w").close()
    >>> os.path.basename(latest_checkpoint(root))
    'checkpoint-4'
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from ..io import CONFIG_NAME, PEFT_WEIGHTS_NAME, POSTERIOR_NAME
from ..layers import ADAPTER_NAME
from ..monteclora import MonteCLoRA

__all__ = ["latest_checkpoint", "restore_adapter_state", "TRAINER_STATE"]

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(folder: str) -> bool:
    """Whether a checkpoint folder was written to the end (its ``trainer_state.json`` whole JSON: a
    kill while Trainer wrote it leaves an empty or truncated file)."""
    if not all(os.path.isfile(os.path.join(folder, name)) for name in (TRAINER_STATE, CONFIG_NAME)):
        return False
    try:
        with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete ``checkpoint-<step>`` with the highest step in ``output_dir`` (or ``None``)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path) and is_complete(path):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


@torch.no_grad()
def restore_adapter_state(monteclora: MonteCLoRA, folder: str) -> None:
    """Copy the adapter (A, B, head) and the variational parameters saved in ``folder`` into
    ``monteclora``, exactly (for resuming: the optimizer and schedules are Trainer's)."""
    for name in (PEFT_WEIGHTS_NAME, POSTERIOR_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder!r} is not a MonteCLoRA checkpoint: {name} is missing")
    weights = load_file(os.path.join(folder, PEFT_WEIGHTS_NAME))
    outcome = set_peft_model_state_dict(monteclora.network, weights, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(outcome, "unexpected_keys", []))
    if unexpected:
        raise ValueError(
            f"the checkpoint {folder!r} does not fit this model: {len(unexpected)} unexpected tensor(s), "
            f"first {unexpected[0]!r}"
        )
    monteclora.guide.load_state_dict(load_file(os.path.join(folder, POSTERIOR_NAME)), strict=True)
