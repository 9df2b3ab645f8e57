"""Write MonteCLoRA adapters: the adapter folder, training checkpoints and merged models.

Training (``train()`` and the Trainer's checkpoints) saves through one function,
:func:`save_trained`.

An adapter folder holds a standard peft LoRA adapter of the posterior mean, the variational
posterior (safetensors) and ``monteclora_config.json`` (:mod:`pyro_monteclora.io.format`); a
merged output is a plain transformers model with that folder in ``adapter/``. Each is built
beside its target and moved into place (:func:`pyro_monteclora.io.atomic.atomic_write`).
Import these functions from :mod:`pyro_monteclora.io`.

Example:
    >>> import os, tempfile
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.io import save_pretrained
    >>> from pyro_monteclora.testing import tiny_bert
    >>> folder = save_pretrained(MonteCLoRA.from_model(tiny_bert(), lora_r=4), tempfile.mkdtemp() + "/adapter")
    >>> sorted(f for f in os.listdir(folder) if f.endswith((".json", ".safetensors")))
    ['adapter_config.json', 'adapter_model.safetensors', 'monteclora_config.json', 'monteclora_posterior.safetensors']
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write, check_finite
from .format import (
    ADAPTER_SUBFOLDER,
    CONFIG_NAME,
    POSTERIOR_NAME,
    AdapterModel,
    PathLike,
    base_model_name,
    metadata_record,
    package_version,
    write_json,
)
from ..layers import ADAPTER_NAME
from .model_card import model_card
from ..quantization import is_quanto, dense_weight, quantization_of
from ..quiet import quiet

__all__ = ["save_pretrained", "save_merged", "save_result", "save_trained", "merged_state_dict", "final_metrics"]


def _write_adapter(monteclora: AdapterModel, folder: str, metrics: Optional[dict], card: bool) -> None:
    from peft.utils import get_peft_model_state_dict

    posterior = {k: v.detach().cpu().contiguous() for k, v in monteclora.guide.state_dict().items()}
    check_finite(posterior, "the variational posterior")
    check_finite(get_peft_model_state_dict(monteclora.network, adapter_name=ADAPTER_NAME), "the adapter")
    os.makedirs(folder, exist_ok=True)
    with quiet():
        monteclora.network.save_pretrained(folder, safe_serialization=True)
    save_file(posterior, os.path.join(folder, POSTERIOR_NAME), metadata={"format": "pt"})
    write_json(os.path.join(folder, CONFIG_NAME), metadata_record(monteclora, metrics))
    readme = os.path.join(folder, "README.md")
    if card:
        _write_card(monteclora, folder, merged=False, metrics=metrics)
    elif os.path.exists(readme):
        os.remove(readme)


def _write_card(monteclora: AdapterModel, folder: str, merged: bool, metrics: Optional[dict]) -> None:
    card = model_card(
        monteclora.monteclora_config,
        base_model=base_model_name(monteclora),
        task=monteclora.task,
        merged=merged,
        metrics=metrics,
        version=package_version(),
    )
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(card)


def save_pretrained(
    monteclora: AdapterModel,
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

    return atomic_write(folder, overwrite, write)


def _is_quantized_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and (is_quanto(weight) or type(module).__module__.startswith("bitsandbytes"))


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
    monteclora: AdapterModel,
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
        check_finite(state, "the merged model")
        with quiet():  # transformers' "Writing model shards" bar
            base.save_pretrained(tmp, state_dict=state)
        if monteclora.tokenizer is not None:
            monteclora.tokenizer.save_pretrained(tmp)
        _write_adapter(monteclora, os.path.join(tmp, ADAPTER_SUBFOLDER), metrics, card=True)
        _write_card(monteclora, tmp, merged=True, metrics=metrics)

    return atomic_write(folder, overwrite, write)


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


def save_trained(
    monteclora: AdapterModel,
    folder: PathLike,
    *,
    checkpoint: bool = False,
    merge_adapter: Optional[bool] = None,
    metrics: Optional[dict] = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> str:
    """The one function training saves through: a Trainer checkpoint, or the run's output.

    Args:
        monteclora: the trained model.
        folder: where to write.
        checkpoint: write the adapter files (no model card) into ``folder``, a folder that
            Trainer made and owns (``checkpoint-<step>`` or ``save_model``'s); Trainer writes its
            optimizer, scheduler and ``trainer_state.json`` beside them, last, which marks the
            checkpoint complete. Otherwise ``folder`` is the run's output, built beside and moved
            into place (:func:`save_merged` or :func:`save_pretrained`, with a model card).
        merge_adapter: for an output, a merged model (``True``) or the adapter alone; default
            ``monteclora.monteclora_config.merge_adapter``. Not for a checkpoint.
        metrics: for an output, the metrics of its model card.
        tokenizer: for a checkpoint, the tokenizer saved into it (default: ``monteclora.tokenizer``;
            an output always saves ``monteclora.tokenizer``).
        overwrite: for an output, replace a non-empty folder that is not a previous output.

    Non-finite tensors are refused before anything is written. Returns the folder's absolute path.
    """
    if checkpoint:
        if merge_adapter or metrics or overwrite:
            raise ValueError("a checkpoint holds the adapter alone: merge_adapter, metrics and overwrite are for outputs")
        folder = os.path.abspath(os.fspath(folder))
        _write_adapter(monteclora, folder, metrics=None, card=False)
        tokenizer = tokenizer if tokenizer is not None else monteclora.tokenizer
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder)
        return folder
    if tokenizer is not None and tokenizer is not monteclora.tokenizer:
        raise ValueError("an output saves monteclora.tokenizer; set it instead of passing tokenizer=")
    if merge_adapter is None:
        merge_adapter = monteclora.monteclora_config.merge_adapter
    save = save_merged if merge_adapter else save_pretrained
    return save(monteclora, folder, metrics=metrics, overwrite=overwrite)


def save_result(result: Any, folder: PathLike, *, overwrite: bool = False) -> str:
    """Save what :func:`~pyro_monteclora.train` returned: merged by default, per ``merge_adapter``.

    With ``result.config.merge_adapter`` (the default) the folder is a merged transformers model
    with the Bayesian adapter in ``adapter/``; otherwise it is the adapter folder itself. The
    model card lists the final metrics (:func:`final_metrics`). Goes through :func:`save_trained`.
    """
    config = result.config or result.model.monteclora_config
    return save_trained(
        result.model, folder, merge_adapter=config.merge_adapter, metrics=final_metrics(result), overwrite=overwrite
    )
