"""Read MonteCLoRA adapters back: find the adapter folder, read its record, restore it on a base.

Only JSON and safetensors files are ever read: no pickle is loaded from a folder. Import these
functions from :mod:`pyro_monteclora.io`.

Example:
    >>> import tempfile
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.io_load import load, read_metadata
    >>> from pyro_monteclora.io_save import save_pretrained
    >>> from pyro_monteclora.testing import tiny_bert
    >>> folder = save_pretrained(MonteCLoRA.from_model(tiny_bert(), lora_r=4), tempfile.mkdtemp() + "/adapter")
    >>> read_metadata(folder)["config"]["lora_r"]
    4
    >>> load(tiny_bert(), folder).task
    'classification'
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from .config import MonteCLoRAConfig
from .io_format import (
    ADAPTER_SUBFOLDER,
    CONFIG_NAME,
    FORMAT_VERSION,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    PICKLE_SUFFIXES,
    POSTERIOR_NAME,
    PathLike,
)
from .layers import ADAPTER_NAME

if TYPE_CHECKING:  # pragma: no cover
    from .monteclora import MonteCLoRA

__all__ = ["load", "adapter_folder", "read_metadata"]


def adapter_folder(folder: PathLike) -> str:
    """The adapter folder of a saved output: ``folder`` itself or its ``adapter/`` subfolder."""
    folder = os.fspath(folder)
    for candidate in (folder, os.path.join(folder, ADAPTER_SUBFOLDER)):
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            return candidate
    if os.path.isfile(os.path.join(folder, PEFT_CONFIG_NAME)):
        raise ValueError(
            f"{folder!r} holds a peft adapter but no {CONFIG_NAME}: it was not written by pyro-monteclora "
            "(load it with peft.PeftModel.from_pretrained)"
        )
    raise FileNotFoundError(f"no pyro-monteclora adapter in {folder!r} (expected {CONFIG_NAME})")


def read_metadata(folder: PathLike) -> dict[str, Any]:
    """The contents of ``monteclora_config.json`` of a saved output (JSON only)."""
    with open(os.path.join(adapter_folder(folder), CONFIG_NAME), encoding="utf-8") as handle:
        return json.load(handle)


def _safetensors_file(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
    hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
    raise FileNotFoundError(f"{name} is missing from {folder!r}{hint}")


def _tokenizer_in(folders: list[str]) -> Any:
    for folder in folders:
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return None


def load(
    base_model: Union[nn.Module, PathLike],
    folder: PathLike,
    *,
    tokenizer: Any = None,
    device: Optional[Union[str, torch.device]] = None,
) -> "MonteCLoRA":
    """Restore the full Bayesian adapter saved in ``folder`` on ``base_model``.

    Args:
        base_model: the base transformers model (modified in place by peft; used as given,
            quantized or not), or its path or hub id (loaded from safetensors and quantized as in
            training).
        folder: an adapter folder or a merged output (its ``adapter/`` subfolder is used).
        tokenizer: the tokenizer; by default the one saved in the folder, if any.
        device: where to put the model (default: where the base model is).

    The adapter weights, the task head and the variational parameters are restored exactly, so
    the posterior predictive with the same seed gives the same outputs as before saving.
    """
    from .monteclora import MonteCLoRA
    from .quantization import load_base_model

    root = os.fspath(folder)
    folder = adapter_folder(root)
    meta = read_metadata(root)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{folder!r} was written by pyro-monteclora {meta.get('pyro_monteclora_version')} in a newer format; "
            "upgrade pyro-monteclora"
        )
    config = MonteCLoRAConfig.from_dict(meta["config"]).replace(task=meta["task"])
    weights = load_file(_safetensors_file(folder, PEFT_WEIGHTS_NAME))
    posterior = load_file(_safetensors_file(folder, POSTERIOR_NAME))
    if not isinstance(base_model, nn.Module):
        base_model = load_base_model(
            base_model,
            meta["task"],
            config.quantization,
            num_labels=meta.get("num_labels"),
            id2label=meta.get("id2label"),
            device=None if device is None else str(device),
            exclude=config.modules_to_save,
        )
    with torch.random.fork_rng():  # LoRA's random init must not move the caller's RNG
        # A base model object is used as given (quantized or not): quantization=None here.
        monteclora = MonteCLoRA.from_model(base_model, config.replace(quantization=None), tokenizer=tokenizer)
    monteclora.monteclora_config = config
    saved_groups = [(g["name"], tuple(g["module_names"])) for g in meta["groups"]]
    built_groups = [(g.name, g.module_names) for g in monteclora.groups]
    if saved_groups != built_groups:
        raise ValueError(
            f"the base model's adapted layers {built_groups} differ from the saved ones {saved_groups}: "
            "is it the same base model?"
        )
    outcome = set_peft_model_state_dict(monteclora.network, weights, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(outcome, "unexpected_keys", []))
    missing = [k for k in getattr(outcome, "missing_keys", []) if "lora_" in k or "modules_to_save" in k]
    if unexpected or missing:
        raise ValueError(
            f"the adapter in {folder!r} does not fit the base model: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    monteclora.guide.load_state_dict(posterior, strict=True)
    if device is not None:
        monteclora.to(device)
    if monteclora.tokenizer is None:
        monteclora.tokenizer = _tokenizer_in([folder, root])
    return monteclora.eval()
