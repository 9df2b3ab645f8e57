"""Save and load MonteCLoRA adapters: standard peft files for the mean, safetensors for the posterior.

An adapter folder holds

- ``adapter_config.json`` + ``adapter_model.safetensors``: a standard peft LoRA adapter of the
  posterior mean (A, B and the trained task head), loadable by stock
  ``peft.PeftModel.from_pretrained(base, folder)``;
- ``monteclora_posterior.safetensors``: the variational parameters of the guide;
- ``monteclora_config.json``: the :class:`MonteCLoRAConfig`, the task, the layer groups and the
  package version (JSON, sorted keys);
- ``README.md``: a model card; the tokenizer files when one is known.

A *merged* output (the default of :func:`save_result`, as ``merge_adapter=True``) is a plain
transformers model folder (``config.json``, ``model.safetensors``, tokenizer, model card) with
the adapter folder above in its ``adapter/`` subfolder. Only JSON and safetensors files are ever
read back: no pickle is loaded from a folder.

Example:
    >>> import tempfile, torch
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.io import load, save_pretrained
    >>> from pyro_monteclora.testing import tiny_bert
    >>> mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    >>> folder = save_pretrained(mc, tempfile.mkdtemp() + "/adapter")
    >>> again = load(tiny_bert(), folder)
    >>> batch = {"input_ids": torch.tensor([[1, 5, 2]])}
    >>> torch.equal(mc.mean_logits(batch), again.mean_logits(batch))
    True
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MonteCLoRAConfig
from .layers import ADAPTER_NAME
from .model_card import model_card
from .quantization import _is_quanto, dense_weight, quantization_of

if TYPE_CHECKING:  # pragma: no cover
    from .monteclora import MonteCLoRA

__all__ = [
    "save_pretrained",
    "save_merged",
    "save_result",
    "load",
    "merged_state_dict",
    "adapter_folder",
    "read_metadata",
    "CONFIG_NAME",
    "POSTERIOR_NAME",
    "ADAPTER_SUBFOLDER",
]

PathLike = Union[str, os.PathLike]

CONFIG_NAME = "monteclora_config.json"
POSTERIOR_NAME = "monteclora_posterior.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_SUBFOLDER = "adapter"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# --- writing -------------------------------------------------------------------------------------


def _version() -> str:
    from . import __version__

    return __version__


def _base_name(monteclora: "MonteCLoRA") -> Optional[str]:
    peft_config = monteclora.network.peft_config.get(ADAPTER_NAME)
    name = getattr(peft_config, "base_model_name_or_path", None)
    return name or getattr(getattr(monteclora.network, "config", None), "_name_or_path", None) or None


def _metadata(monteclora: "MonteCLoRA", metrics: Optional[dict]) -> dict[str, Any]:
    network_config = getattr(monteclora.network, "config", None)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "pyro_monteclora_version": _version(),
        "task": monteclora.task,
        "base_model_name_or_path": _base_name(monteclora),
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


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, sort_keys=True, indent=2)
        handle.write("\n")


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``tensors`` if any is not finite (``ValueError`` naming the first one)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"refusing to save {what}: {len(bad)} tensor(s) hold nan or inf, first {bad[0]!r}; "
            "the model diverged (lower the learning rate or sample_scaler); nothing was written"
        )


def _write_adapter(monteclora: "MonteCLoRA", folder: str, metrics: Optional[dict], card: bool) -> None:
    from peft.utils import get_peft_model_state_dict

    posterior = {k: v.detach().cpu().contiguous() for k, v in monteclora.guide.state_dict().items()}
    check_finite(posterior, "the variational posterior")
    check_finite(get_peft_model_state_dict(monteclora.network, adapter_name=ADAPTER_NAME), "the adapter")
    os.makedirs(folder, exist_ok=True)
    monteclora.network.save_pretrained(folder, safe_serialization=True)
    save_file(posterior, os.path.join(folder, POSTERIOR_NAME), metadata={"format": "pt"})
    _write_json(os.path.join(folder, CONFIG_NAME), _metadata(monteclora, metrics))
    readme = os.path.join(folder, "README.md")
    if card:
        _write_card(monteclora, folder, merged=False, metrics=metrics)
    elif os.path.exists(readme):
        os.remove(readme)


def _write_card(monteclora: "MonteCLoRA", folder: str, merged: bool, metrics: Optional[dict]) -> None:
    card = model_card(
        monteclora.monteclora_config,
        base_model=_base_name(monteclora),
        task=monteclora.task,
        merged=merged,
        metrics=metrics,
        version=_version(),
    )
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)


CHECKPOINT_PREFIX = "checkpoint-"


def _checkpoints_in(folder: str) -> list[str]:
    return sorted(
        e for e in os.listdir(folder) if e.startswith(CHECKPOINT_PREFIX) and os.path.isdir(os.path.join(folder, e))
    )


def _is_own_output(folder: str) -> bool:
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)) or os.path.isfile(
        os.path.join(folder, ADAPTER_SUBFOLDER, CONFIG_NAME)
    ):
        return True
    entries = os.listdir(folder)
    return bool(entries) and sorted(entries) == _checkpoints_in(folder)  # only training checkpoints so far


def check_output_folder(folder: str, overwrite: bool) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder!r} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite and not _is_own_output(folder):
        raise FileExistsError(
            f"{folder!r} is not empty and is not a pyro-monteclora output; choose another folder or pass "
            "overwrite=True (--overwrite) to replace it"
        )


def _atomic_write(folder: PathLike, overwrite: bool, write: Any) -> str:
    """Run ``write(tmp)`` in a temporary folder beside ``folder``, then move it into place."""
    folder = os.path.abspath(os.fspath(folder))
    check_output_folder(folder, overwrite)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the usual permissions
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    kept: list[str] = []
    if os.path.exists(folder):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=parent)
        os.rmdir(backup)
        os.rename(folder, backup)
    try:
        if backup is not None:  # training checkpoints stay with the output they belong to
            for name in _checkpoints_in(backup):
                os.rename(os.path.join(backup, name), os.path.join(tmp, name))
                kept.append(name)
        os.rename(tmp, folder)
    except BaseException:
        if backup is not None:
            for name in kept:
                os.rename(os.path.join(tmp, name), os.path.join(backup, name))
            os.rename(backup, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return folder


def write_checkpoint_files(monteclora: "MonteCLoRA", folder: PathLike, tokenizer: Any = None) -> None:
    """Write the adapter files into an existing ``folder`` (a Trainer ``checkpoint-<step>``).

    The folder then loads with :func:`load` like any adapter folder. Non-finite tensors are
    refused before anything is written.
    """
    folder = os.fspath(folder)
    _write_adapter(monteclora, folder, metrics=None, card=False)
    tokenizer = tokenizer if tokenizer is not None else monteclora.tokenizer
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def save_pretrained(
    monteclora: "MonteCLoRA",
    folder: PathLike,
    *,
    metrics: Optional[dict] = None,
    overwrite: bool = False,
) -> str:
    """Save the adapter (mean as standard peft LoRA, posterior, config, model card, tokenizer).

    The folder is written beside, then moved into place, so a failure leaves an existing folder
    as it was. A non-empty folder that is not a previous pyro-monteclora output is only replaced
    with ``overwrite=True``. Returns the folder's absolute path.
    """

    def write(tmp: str) -> None:
        _write_adapter(monteclora, tmp, metrics, card=True)
        if monteclora.tokenizer is not None:
            monteclora.tokenizer.save_pretrained(tmp)

    return _atomic_write(folder, overwrite, write)


def _is_quantized_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and (_is_quanto(weight) or type(module).__module__.startswith("bitsandbytes"))


@torch.no_grad()
def merged_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the base model with the mean adapter merged in; ``network`` is not modified.

    Keys are those of the plain transformers model: each LoRA layer's weight becomes
    ``W + (alpha / r) B A``, a ``modules_to_save`` module contributes its trained copy, and
    quantized weights are dequantized.
    """
    base = network.get_base_model()
    special: dict[str, torch.Tensor] = {}
    prefixes: list[str] = []

    def taken(name: str) -> bool:
        return any(name.startswith(p) for p in prefixes)

    for name, module in base.named_modules():
        if not name or taken(name + "."):
            continue
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            weight = dense_weight(layer)
            special[f"{name}.weight"] = weight + module.get_delta_weight(ADAPTER_NAME).to(weight.dtype)
            if getattr(layer, "bias", None) is not None:
                special[f"{name}.bias"] = layer.bias.detach()
            prefixes.append(name + ".")
        elif isinstance(module, ModulesToSaveWrapper):
            active = module.modules_to_save[ADAPTER_NAME]
            for key, value in active.state_dict().items():
                special[f"{name}.{key}"] = value.detach()
            prefixes.append(name + ".")
        elif _is_quantized_layer(module):
            special[f"{name}.weight"] = dense_weight(module)
            if getattr(module, "bias", None) is not None:
                special[f"{name}.bias"] = module.bias.detach()
            prefixes.append(name + ".")
    state = {k: v.detach() for k, v in base.state_dict().items() if not taken(k)}
    state.update(special)
    return {k: v.contiguous() for k, v in state.items()}


def save_merged(
    monteclora: "MonteCLoRA",
    folder: PathLike,
    *,
    metrics: Optional[dict] = None,
    overwrite: bool = False,
) -> str:
    """Save base + mean adapter as a plain transformers model, the adapter in ``adapter/``.

    The in-memory model is left untouched (the merged weights are computed beside it). Merging
    into a quantized base warns: the merged weights are the dequantized base plus the adapter.
    """
    network = monteclora.network
    quantized = quantization_of(network)
    if quantized:
        warnings.warn(
            f"merging into a {quantized}-quantized base: the merged model holds the dequantized base "
            "weights plus the adapter in full precision, so its outputs differ slightly from the "
            "quantized model's; keep the adapter (merge_adapter=False) to reproduce them exactly",
            stacklevel=2,
        )

    def write(tmp: str) -> None:
        base = network.get_base_model()
        state = merged_state_dict(network)
        if quantized:
            state = {k: v for k, v in state.items() if not k.endswith(("input_scale", "output_scale"))}
        base.save_pretrained(tmp, state_dict=state)
        if monteclora.tokenizer is not None:
            monteclora.tokenizer.save_pretrained(tmp)
        _write_adapter(monteclora, os.path.join(tmp, ADAPTER_SUBFOLDER), metrics, card=True)
        _write_card(monteclora, tmp, merged=True, metrics=metrics)

    return _atomic_write(folder, overwrite, write)


def final_metrics(result: Any) -> dict[str, float]:
    """The last evaluation's metrics (``eval_``) and the last step's training terms (``train_``).

    NLLs carry their unit in the name, the same for training and evaluation: ``nll_per_example``
    for classification; for a causal LM ``nll_per_sequence`` (the ELBO's unit, training and
    evaluation) and ``eval_nll_per_token``.
    """
    causal = getattr(result.model, "task", None) == "causal_lm"
    unit = "nll_per_sequence" if causal else "nll_per_example"
    metrics: dict[str, float] = {}
    if result.history:
        last = result.history[-1]
        metrics.update({f"train_{k}": float(last[k]) for k in ("loss", "kl") if k in last})
        if "nll" in last:
            metrics[f"train_{unit}"] = float(last["nll"])
        metrics["train_steps"] = int(last.get("step", len(result.history)))
    if result.evaluations:
        for key, value in result.evaluations[-1].items():
            if key == "epoch":
                continue
            name = {"nll": "nll_per_token" if causal else unit}.get(key, key)
            metrics[f"eval_{name}"] = float(value)
    return metrics


def save_result(result: Any, folder: PathLike, *, overwrite: bool = False) -> str:
    """Save what :func:`~pyro_monteclora.train` returned: merged by default, per ``merge_adapter``.

    With ``result.config.merge_adapter`` (the default) the folder is a merged transformers model
    with the Bayesian adapter in ``adapter/``; otherwise it is the adapter folder itself. The
    model card lists the final metrics.
    """
    config = result.config or result.model.monteclora_config
    metrics = final_metrics(result)
    if config.merge_adapter:
        return save_merged(result.model, folder, metrics=metrics, overwrite=overwrite)
    return save_pretrained(result.model, folder, metrics=metrics, overwrite=overwrite)


# --- reading -------------------------------------------------------------------------------------


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
