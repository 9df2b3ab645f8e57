"""What a saved MonteCLoRA folder is made of: the file names and the ``monteclora_config.json`` record.

:mod:`pyro_monteclora.io.save` writes these files and :mod:`pyro_monteclora.io.read` reads them
back; both take every name from here, so the two cannot drift apart.

Example:
    >>> from pyro_monteclora.io.format import CONFIG_NAME, POSTERIOR_NAME, ADAPTER_SUBFOLDER
    >>> CONFIG_NAME, POSTERIOR_NAME, ADAPTER_SUBFOLDER
    ('monteclora_config.json', 'monteclora_posterior.safetensors', 'adapter')
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Protocol, Sequence, Union

from torch import nn

from .._version import __version__
from ..config import MonteCLoRAConfig
from ..layers import ADAPTER_NAME, LayerGroup

__all__ = [
    "CONFIG_NAME",
    "POSTERIOR_NAME",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "ADAPTER_SUBFOLDER",
    "FORMAT_VERSION",
    "PICKLE_SUFFIXES",
    "CHECKPOINT_PREFIX",
    "PathLike",
    "AdapterModel",
    "package_version",
    "base_model_name",
    "metadata_record",
    "write_json",
]

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "monteclora_config.json"
POSTERIOR_NAME = "monteclora_posterior.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_SUBFOLDER = "adapter"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CHECKPOINT_PREFIX = "checkpoint-"


class AdapterModel(Protocol):
    """What io reads from a model it saves: a :class:`~pyro_monteclora.MonteCLoRA` has all of it.

    io sits below the core, as peft's save helpers sit below ``PeftModel``: it never imports
    :class:`~pyro_monteclora.MonteCLoRA`, only this shape.
    """

    network: nn.Module
    guide: nn.Module
    task: str
    monteclora_config: MonteCLoRAConfig
    groups: Sequence[LayerGroup]
    tokenizer: Any


def package_version() -> str:
    """The installed pyro-monteclora version, recorded in every saved folder."""
    return __version__


def base_model_name(monteclora: AdapterModel) -> Optional[str]:
    """The base model's folder or hub id, as peft or transformers recorded it (or ``None``)."""
    peft_config = monteclora.network.peft_config.get(ADAPTER_NAME)
    name = getattr(peft_config, "base_model_name_or_path", None)
    return name or getattr(getattr(monteclora.network, "config", None), "_name_or_path", None) or None


def metadata_record(monteclora: AdapterModel, metrics: Optional[dict]) -> dict[str, Any]:
    """The contents of ``monteclora_config.json``: format, version, task, config, layer groups, metrics."""
    network_config = getattr(monteclora.network, "config", None)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "pyro_monteclora_version": package_version(),
        "task": monteclora.task,
        "base_model_name_or_path": base_model_name(monteclora),
        "config": monteclora.monteclora_config.to_dict(),
        "groups": [
            {"name": g.name, "in_features": g.in_features, "rank": g.rank, "module_names": list(g.module_names)}
            for g in monteclora.groups
        ],
        "metrics": dict(metrics or {}),
    }
    if monteclora.task == "classification" and network_config is not None:
        meta["num_labels"] = int(network_config.num_labels)
        meta["id2label"] = {str(k): v for k, v in getattr(network_config, "id2label", {}).items()}
    return meta


def write_json(path: str, value: Any) -> None:
    """Write ``value`` as JSON with sorted keys, indented, ending in a newline."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, sort_keys=True, indent=2)
        handle.write("\n")

