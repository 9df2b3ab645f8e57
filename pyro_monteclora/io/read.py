"""Read MonteCLoRA adapters back: find the adapter folder, read its record, restore it on a base.

Only JSON and safetensors files are ever read: no pickle is loaded from a folder. Building the
model is :func:`pyro_monteclora.load`'s job (in :mod:`pyro_monteclora.monteclora`); this module
reads and checks the files and puts their tensors into a model it is given.

Example:
    >>> import tempfile
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.io import read_adapter, save_pretrained
    >>> from pyro_monteclora.testing import tiny_bert
    >>> folder = save_pretrained(MonteCLoRA.from_model(tiny_bert(), lora_r=4), tempfile.mkdtemp() + "/adapter")
    >>> saved = read_adapter(folder)
    >>> saved.config.lora_r, saved.meta["task"]
    (4, 'classification')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from ..config import MonteCLoRAConfig
from .format import (
    ADAPTER_SUBFOLDER,
    CONFIG_NAME,
    FORMAT_VERSION,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    PICKLE_SUFFIXES,
    AdapterModel,
    POSTERIOR_NAME,
    PathLike,
)
from ..layers import ADAPTER_NAME

__all__ = ["SavedAdapter", "read_adapter", "restore_adapter", "adapter_folder", "read_metadata", "check_model_path",
           "check_num_labels", "read_json_object"]


def adapter_folder(folder: PathLike) -> str:
    """The adapter folder of a saved output: ``folder`` itself or its ``adapter/`` subfolder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"adapter folder {folder!r} does not exist" if not os.path.exists(folder)
                                else f"{folder!r} is a file, not an adapter folder")
    for candidate in (folder, os.path.join(folder, ADAPTER_SUBFOLDER)):
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            return candidate
    if os.path.isfile(os.path.join(folder, PEFT_CONFIG_NAME)):
        raise ValueError(
            f"{folder!r} holds a peft adapter but no {CONFIG_NAME}: a plain peft adapter (load it with "
            "peft.PeftModel.from_pretrained) or an incomplete pyro-monteclora folder"
        )
    raise FileNotFoundError(f"no pyro-monteclora adapter in {folder!r} (expected {CONFIG_NAME})")


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file, the 1-based line and the reason."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}, line {error.lineno}: invalid JSON ({error.msg}, column {error.colno}); the file is damaged"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8; the file is damaged") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(value).__name__}; the file is damaged")
    return value


#: The fields of ``monteclora_config.json`` that :func:`load` needs, and their JSON types.
REQUIRED_FIELDS = {"config": dict, "task": str, "groups": list}


def read_metadata(folder: PathLike) -> dict[str, Any]:
    """The contents of ``monteclora_config.json`` of a saved output (JSON only).

    A file that is not JSON, not an object, or lacks ``config``/``task``/``groups`` raises one
    ``ValueError`` naming the file (and the line, for invalid JSON).
    """
    path = os.path.join(adapter_folder(folder), CONFIG_NAME)
    meta = read_json_object(path)
    for name, kind in REQUIRED_FIELDS.items():
        if not isinstance(meta.get(name), kind):
            raise ValueError(
                f"{path}: the field {name!r} is missing or not a JSON {kind.__name__}; the file is damaged"
            )
    return meta


def check_model_path(path: PathLike, what: str = "base model") -> None:
    """Refuse a path that looks local but does not exist (a hub id such as ``org/name`` passes)."""
    path = os.fspath(path)
    if os.path.exists(path):
        return
    if os.path.isabs(path) or path.startswith(("./", "../", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"{what} folder {path!r} does not exist")


def _safetensors_file(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
        return path
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
    hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
    raise FileNotFoundError(f"{name} is missing from {folder!r}{hint}")


def _read_tensors(folder: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, refused (naming the file) if unreadable or not finite."""
    path = _safetensors_file(folder, name)
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors' SafetensorError: a truncated or damaged file
        reason = " ".join(str(error).split())[:160]
        raise ValueError(f"{path}: not a readable safetensors file ({reason}); it is truncated or damaged") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{path}: {len(bad)} of {len(tensors)} tensor(s) hold nan or inf, first {bad[0]!r}; "
            "the file is damaged (pyro-monteclora never saves such tensors)"
        )
    return tensors


def _check_peft_config(folder: str) -> None:
    """``adapter_config.json`` (the peft half, what stock peft loads) must be there and readable."""
    path = os.path.join(folder, PEFT_CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{PEFT_CONFIG_NAME} is missing from {folder!r}: the adapter folder is incomplete; save it again"
        )
    peft_type = read_json_object(path).get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{path}: peft_type is {peft_type!r}; a pyro-monteclora adapter is a LORA adapter")


def _first_differences(saved: dict[str, Any], built: dict[str, Any], saved_as: str, built_as: str) -> list[str]:
    """One phrase per key whose value differs between ``saved`` and ``built`` (or is in one only)."""
    found = []
    for key in sorted(set(saved) | set(built)):
        if key not in built:
            found.append(f"{key!r} is in the {saved_as} but not in the {built_as}")
        elif key not in saved:
            found.append(f"{key!r} is in the {built_as} but not in the {saved_as}")
        elif saved[key] != built[key]:
            found.append(f"{key!r} is {saved[key]} in the {saved_as}, {built[key]} in the {built_as}")
    return found


def _check_groups(meta: dict[str, Any], monteclora: AdapterModel, folder: str) -> None:
    saved = [(g["name"], tuple(g["module_names"])) for g in meta["groups"]]
    built = [(g.name, g.module_names) for g in monteclora.groups]
    if saved == built:
        return
    widths = {m: f"{g['in_features']} wide" for g in meta["groups"] for m in g["module_names"]}
    base = {m: f"{g.in_features} wide" for g in monteclora.groups for m in g.module_names}
    differ = _first_differences(widths, base, "adapter", "base model")
    if not differ:  # same layers and widths, grouped otherwise
        widths = {m: f"in group {g['name']}" for g in meta["groups"] for m in g["module_names"]}
        differ = _first_differences(widths, {m: f"in group {g.name}" for g in monteclora.groups for m in g.module_names},
                                    "adapter", "base model")
    name = meta.get("base_model_name_or_path")
    trained_on = f" ({name})" if name else ""
    raise ValueError(
        f"the base model does not fit the adapter in {folder!r}: {len(differ)} of {len(set(widths) | set(base))} "
        f"adapted layers differ, e.g. {differ[0]}; load it on the base model it was trained on{trained_on}"
    )


def _check_shapes(saved: dict[str, torch.Tensor], built: dict[str, torch.Tensor], path: str, what: str) -> None:
    """Every saved tensor has its place and shape in the model; every LoRA factor of the model is saved."""
    built = {k: v for k, v in built.items() if k in saved or "lora_" in k or what == "posterior"}
    differ = _first_differences(
        {k: tuple(v.shape) for k, v in saved.items()}, {k: tuple(v.shape) for k, v in built.items()}, "file", "model"
    )
    if differ:
        raise ValueError(
            f"{path} does not fit the {what} built from {CONFIG_NAME}: {len(differ)} of "
            f"{len(set(saved) | set(built))} tensors differ, e.g. {differ[0]}; was lora_r or target_modules "
            f"edited in {CONFIG_NAME}?"
        )


def check_num_labels(meta: dict[str, Any], base_model: nn.Module, folder: str) -> None:
    saved = meta.get("num_labels")
    have = getattr(getattr(base_model, "config", None), "num_labels", None)
    if meta["task"] == "classification" and saved is not None and have is not None and saved != have:
        raise ValueError(
            f"the adapter in {folder!r} has a {saved}-class head, the base model has num_labels={have}: load the "
            f"base with num_labels={saved} (from_pretrained(path, num_labels={saved})), or pass its path to load()"
        )


def _tokenizer_in(folders: list[str]) -> Any:
    for folder in folders:
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return None


@dataclass
class SavedAdapter:
    """What an adapter folder holds, read and checked: the record, the config and both tensor files."""

    root: str
    folder: str
    meta: dict[str, Any]
    config: MonteCLoRAConfig
    weights: dict[str, torch.Tensor]
    posterior: dict[str, torch.Tensor]


def read_adapter(folder: PathLike) -> SavedAdapter:
    """Read a saved adapter (or merged output) without building a model: JSON and safetensors only.

    Errors name the file and what is wrong with it (a newer format, an invalid config, a missing
    or damaged tensor file). :func:`pyro_monteclora.load` builds the model from what this returns.
    """
    root = os.fspath(folder)
    folder = adapter_folder(root)
    meta = read_metadata(root)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{folder!r} was written by pyro-monteclora {meta.get('pyro_monteclora_version')} in a newer format; "
            "upgrade pyro-monteclora"
        )
    try:
        config = MonteCLoRAConfig.from_dict(meta["config"]).replace(task=meta["task"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{os.path.join(folder, CONFIG_NAME)}: the 'config' field is invalid ({error})") from None
    _check_peft_config(folder)
    return SavedAdapter(root, folder, meta, config, _read_tensors(folder, PEFT_WEIGHTS_NAME),
                        _read_tensors(folder, POSTERIOR_NAME))


def restore_adapter(monteclora: AdapterModel, saved: SavedAdapter) -> None:
    """Put the saved adapter weights, task head and posterior into a model built from ``saved.config``.

    Every tensor is checked for its place and shape first, so a mismatch leaves the model untouched
    and raises one error naming the file.
    """
    monteclora.monteclora_config = saved.config
    _check_groups(saved.meta, monteclora, saved.folder)
    _check_shapes(saved.weights, get_peft_model_state_dict(monteclora.network, adapter_name=ADAPTER_NAME),
                  os.path.join(saved.folder, PEFT_WEIGHTS_NAME), "adapter")
    _check_shapes(saved.posterior, monteclora.guide.state_dict(), os.path.join(saved.folder, POSTERIOR_NAME),
                  "posterior")
    set_peft_model_state_dict(monteclora.network, saved.weights, adapter_name=ADAPTER_NAME)
    monteclora.guide.load_state_dict(saved.posterior, strict=True)
    if monteclora.tokenizer is None:
        monteclora.tokenizer = _tokenizer_in([saved.folder, saved.root])
