"""Convert the mean LoRA adapter to and from the Kohya (sd-scripts) single-file format.

Kohya keys are ``lora_<module path with _>.lora_down.weight`` (peft's ``lora_A``),
``.lora_up.weight`` (``lora_B``) and ``.alpha``; loaders scale the update by ``alpha / rank``.
The ``.alpha`` written here is ``scaling * rank`` of the trained layer — ``lora_alpha`` for
standard LoRA — so the scale is preserved (writing the rank instead, as some converters do,
silently sets the scale to 1).

Tensors of fully trained modules (peft's ``modules_to_save``, e.g. a classifier) are kept under
their peft key (which does not start with ``lora_``, so Kohya loaders ignore them). The
safetensors metadata carries the peft adapter config and the module paths, so
:func:`kohya_to_peft` gives back the same adapter.

Example:
    >>> from pyro_monteclora.export.kohya import peft_to_kohya, kohya_to_peft
    >>> peft_to_kohya("adapter", "adapter.safetensors")        # doctest: +SKIP
    >>> kohya_to_peft("adapter.safetensors", "adapter-again")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..io.atomic import atomic_write, atomic_write_file, check_finite, recover_output
from ..io.lock import hold_output
from ..io.read import read_json_object

__all__ = ["peft_to_kohya", "kohya_to_peft", "kohya_key", "to_kohya_state_dict", "from_kohya_state_dict"]

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")
_KOHYA_KEY = re.compile(r"^lora_(?P<name>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
META_CONFIG = "pyro_monteclora.adapter_config"
META_MODULES = "pyro_monteclora.modules"


def kohya_key(module_path: str) -> str:
    """``lora_`` + the module path with dots replaced by underscores."""
    return "lora_" + module_path.replace(".", "_")


def _module_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha = config.get("lora_alpha", 8)
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        key = get_pattern_key(pattern.keys(), module)
        alpha = pattern.get(key, alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def to_kohya_state_dict(
    state: dict[str, torch.Tensor], config: dict[str, Any], include_modules_to_save: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Kohya tensors and metadata from a peft LoRA state dict and its ``adapter_config.json`` dict."""
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise ValueError("only plain LoRA adapters (no DoRA or other peft types) convert to the Kohya format")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, str] = {}
    ranks = set()
    alphas = set()
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            if include_modules_to_save:
                tensors[key] = value
            continue
        module = match["module"]
        name = kohya_key(module)
        if name in modules and modules[name] != module:
            raise ValueError(f"modules {modules[name]!r} and {module!r} share the Kohya name {name!r}")
        modules[name] = module
        if match["part"] == "A":
            rank = value.shape[0]
            alpha = _module_scaling(config, module, rank) * rank
            tensors[f"{name}.lora_down.weight"] = value
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            ranks.add(rank)
            alphas.add(alpha)
        else:
            tensors[f"{name}.lora_up.weight"] = value
    if not modules:
        raise ValueError("the adapter holds no LoRA tensors (keys ending in lora_A/lora_B.weight)")
    metadata = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": str(max(alphas)),
        META_CONFIG: json.dumps(config, sort_keys=True),
        META_MODULES: json.dumps(modules, sort_keys=True),
    }
    return {k: v.contiguous() for k, v in tensors.items()}, metadata


def from_kohya_state_dict(
    tensors: dict[str, torch.Tensor],
    metadata: Optional[dict[str, str]] = None,
    module_names: Optional[Iterable[str]] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A peft LoRA state dict and ``adapter_config.json`` dict from Kohya tensors.

    Module paths come from the file's metadata (written by :func:`to_kohya_state_dict`) or,
    for other files, from ``module_names`` (the base model's module names, to undo the ``_``).
    """
    metadata = metadata or {}
    if META_MODULES in metadata:
        modules = json.loads(metadata[META_MODULES])
    elif module_names is not None:
        modules = {kohya_key(n): n for n in module_names}
    else:
        raise ValueError(
            "this Kohya file has no pyro-monteclora metadata: pass the base model's module names to map "
            "'lora_a_b_c' back to module paths"
        )
    state: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    for key, value in tensors.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            state[key] = value
            continue
        name = "lora_" + match["name"]
        if name not in modules:
            raise ValueError(f"no module of the base model is called {name!r} in Kohya naming")
        module = modules[name]
        if match["part"] == "alpha":
            alphas[module] = float(value)
        elif match["part"] == "lora_down.weight":
            state[f"{PREFIX}{module}.lora_A.weight"] = value
            ranks[module] = value.shape[0]
        else:
            state[f"{PREFIX}{module}.lora_B.weight"] = value
    config = json.loads(metadata[META_CONFIG]) if META_CONFIG in metadata else {
        "peft_type": "LORA",
        "bias": "none",
        "lora_dropout": 0.0,
        "target_modules": sorted(ranks),
    }
    rank_values = set(ranks.values())
    alpha_values = {alphas.get(m, float(r)) for m, r in ranks.items()}  # Kohya: missing alpha means rank
    if len(rank_values) == 1 and len(alpha_values) == 1:
        config.update(r=rank_values.pop(), lora_alpha=alpha_values.pop(), rank_pattern={}, alpha_pattern={})
        config["use_rslora"] = False
    else:
        config.update(
            r=max(rank_values),
            lora_alpha=max(alpha_values),
            rank_pattern={f"^{re.escape(m)}$": r for m, r in ranks.items()},
            alpha_pattern={f"^{re.escape(m)}$": alphas.get(m, float(r)) for m, r in ranks.items()},
            use_rslora=False,
        )
    return state, config


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors' SafetensorError: a truncated or damaged file
        reason = " ".join(str(error).split())[:160]
        raise ValueError(f"{path}: not a readable safetensors file ({reason}); it is truncated or damaged") from None


def peft_to_kohya(adapter_path: str, output: str, *, include_modules_to_save: bool = True, overwrite: bool = False) -> str:
    """Write the LoRA adapter in ``adapter_path`` (peft or pyro-monteclora folder) as one Kohya file.

    An existing ``output`` is replaced only with ``overwrite=True``; missing parent folders are
    created; tensors that are not finite are refused. The file is written beside and moved into
    place, so a failure leaves an existing file as it was. A second writer of ``output`` is refused
    (:class:`~pyro_monteclora.io.lock.OutputLocked`).
    """
    folder = adapter_path
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        folder = os.path.join(adapter_path, "adapter")
    config_path = os.path.join(folder, "adapter_config.json")
    weights_path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"no peft adapter (adapter_config.json + adapter_model.safetensors) in {adapter_path!r}"
        )
    if not output.endswith(".safetensors"):
        raise ValueError(f"the Kohya output must be a .safetensors file, got {output!r}")
    with hold_output(output):  # one writer: a second one is refused here, before any work
        recover_output(output)  # a temporary file a killed export left
        if os.path.exists(output) and not overwrite:
            raise FileExistsError(f"{output} already exists; pass overwrite=True (--overwrite) to replace it")
        config = read_json_object(config_path)
        tensors, metadata = to_kohya_state_dict(_read_tensors(weights_path), config, include_modules_to_save)
        check_finite(tensors, "the Kohya file")
        # written by safetensors' save_file into the temporary file (the fault campaign injects errors there)
        atomic_write_file(output, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return output


def kohya_to_peft(
    kohya_file: str, output_folder: str, *, module_names: Optional[Iterable[str]] = None, overwrite: bool = False
) -> str:
    """Write a Kohya LoRA file as a peft adapter folder (``adapter_config.json`` + safetensors).

    A non-empty ``output_folder`` is replaced only with ``overwrite=True`` (the rule of
    :func:`pyro_monteclora.io.check_output_folder`); tensors that are not finite are refused; a
    second writer of ``output_folder`` is refused (:class:`~pyro_monteclora.io.lock.OutputLocked`).
    """
    def write(folder: str) -> None:
        save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, sort_keys=True, indent=2)

    with hold_output(output_folder):  # one writer, refused before any work
        tensors = _read_tensors(kohya_file)
        with safe_open(kohya_file, framework="pt") as handle:
            metadata = handle.metadata() or {}
        state, config = from_kohya_state_dict(tensors, metadata, module_names)
        check_finite(state, "the peft adapter")
        atomic_write(output_folder, overwrite, write)
    return output_folder
