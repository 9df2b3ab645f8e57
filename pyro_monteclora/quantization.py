"""Quantized bases: the frozen base weights in 8 or 4 bits, MonteCLoRA adapters trained on top.

- On CUDA, bitsandbytes (NF4 with double quantization, or LLM.int8) at load time, followed by
  peft's ``prepare_model_for_kbit_training`` (without gradient checkpointing: a recomputed
  forward pass would not see the posterior draw of the step).
- On the CPU, optimum-quanto: the base's linear layers (not the task head) are replaced by
  quanto ``QLinear``s holding int8 or int4 weights. ``QLinear`` is an ``nn.Linear``, so peft puts
  its LoRA layers around it unchanged and the stochastic factors train in full precision on top.

Quantize *before* attaching the adapter (as with bitsandbytes); :meth:`MonteCLoRA.from_model`
and :func:`~pyro_monteclora.train` then work as with a full-precision base.

Example:
    >>> from pyro_monteclora.testing import tiny_bert
    >>> from pyro_monteclora.quantization import quantize_base, quantization_of
    >>> base = quantize_base(tiny_bert(), "int8")                  # doctest: +SKIP
    >>> quantization_of(base)                                       # doctest: +SKIP
    'int8'
"""

from __future__ import annotations

import fnmatch
import os
import sys
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .config import QUANTIZATIONS
from .quiet import new_head_note, quiet

__all__ = ["load_base_model", "quantize_base", "quantization_of", "HEAD_MODULES", "dense_weight", "is_quanto",
           "task_of_folder"]

#: Module names never quantized: task heads are trained in full (peft's ``modules_to_save``) or
#: tied to the embeddings.
HEAD_MODULES = ("classifier", "score", "lm_head", "qa_outputs")


def _check(quantization: Optional[str]) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")


def _is_excluded(name: str, exclude: Sequence[str]) -> bool:
    parts = name.split(".")
    for pattern in exclude:
        if fnmatch.fnmatch(name, pattern) or pattern in parts:
            return True
    return False


def quantize_base(
    model: nn.Module, quantization: Optional[str], exclude: Optional[Sequence[str]] = None
) -> nn.Module:
    """Quantize the linear layers of a CPU (or any-device) model in place with optimum-quanto.

    Args:
        model: a transformers model without adapters.
        quantization: ``"int8"``, ``"int4"`` or ``None`` (returns ``model`` untouched).
        exclude: module names (or fnmatch patterns) kept in full precision, in addition to
            :data:`HEAD_MODULES`; pass the ``modules_to_save`` of the run.

    Returns ``model`` with its weights frozen as quanto tensors.
    """
    _check(quantization)
    if quantization is None:
        return model
    if quantization_of(model) is not None:
        raise ValueError(f"{type(model).__name__} is already quantized ({quantization_of(model)})")
    if type(model).__name__ == "PeftModel" or hasattr(model, "peft_config"):
        raise ValueError("quantize the base model before attaching a LoRA adapter, not after")
    try:
        from optimum.quanto import QLinear, qint4, qint8
    except ImportError as error:
        raise ImportError(
            "CPU quantization needs optimum-quanto: pip install 'pyro-monteclora[quantization]'"
        ) from error
    weights = {"int8": qint8, "int4": qint4}[quantization]
    skip = tuple(HEAD_MODULES) + tuple(exclude or ())
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not _is_excluded(name, skip)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    for name, module in targets:
        qlinear = QLinear.from_module(module, weights=weights)
        qlinear.freeze()
        qlinear.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, qlinear)
    return model


def quantization_of(model: nn.Module) -> Optional[str]:
    """``"int8"``/``"int4"`` if some layer of ``model`` holds quantized weights, else ``None``."""
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Linear8bitLt":
            return "int8"
        if kind == "Linear4bit":
            return "int4"
        weight = getattr(module, "weight", None)
        if weight is not None and is_quanto(weight):
            return "int4" if "QBits" in type(weight).__name__ else "int8"
    return None


def is_quanto(tensor: Any) -> bool:
    """Whether ``tensor`` is an optimum-quanto quantized tensor (``QTensor``)."""
    return any(cls.__name__ == "QTensor" for cls in type(tensor).__mro__)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of a (possibly quantized) linear layer as an ordinary floating-point tensor."""
    weight = layer.weight
    if is_quanto(weight):
        return weight.dequantize().detach()
    if type(layer).__module__.startswith("bitsandbytes") or type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(layer).detach()
    return weight.detach()


def _auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "classification":
        return AutoModelForSequenceClassification
    if task in ("causal_lm", "multiple_choice"):  # multiple choice trains a causal LM
        return AutoModelForCausalLM
    raise ValueError(
        f"task must be 'classification', 'causal_lm' or 'multiple_choice' to load a model from a path, got {task!r}"
    )


def task_of_folder(path: str) -> str:
    """``"causal_lm"`` or ``"classification"`` from a model folder's ``config.json`` architectures."""
    import json

    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        architectures = json.load(handle).get("architectures") or []
    for name in architectures:
        if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
            return "causal_lm"
    return "classification"


def load_base_model(
    path_or_model: Any,
    task: str = "auto",
    quantization: Optional[str] = None,
    *,
    num_labels: Optional[int] = None,
    id2label: Optional[dict] = None,
    device: Optional[str] = None,
    torch_dtype: Optional[torch.dtype] = None,
    exclude: Optional[Sequence[str]] = None,
) -> nn.Module:
    """A transformers base model, quantized if asked, ready for :meth:`MonteCLoRA.from_model`.

    Args:
        path_or_model: a local folder or hub id (weights read from safetensors only), or a model.
        task: ``"classification"``, ``"causal_lm"`` (or ``"multiple_choice"``, a causal LM) or
            ``"auto"`` (from the folder's ``architectures``; a folder without a task head counts as
            classification).
        quantization: ``None``, ``"int8"`` or ``"int4"``: bitsandbytes on CUDA, optimum-quanto
            on the CPU.
        num_labels, id2label: classification head size and label names.
        device: ``"cuda"``/``"cpu"``; by default CUDA when available.
        torch_dtype: dtype of the unquantized weights (default: the checkpoint's; fp32 on CPU).
        exclude: extra modules kept in full precision (e.g. ``modules_to_save``).
    """
    _check(quantization)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = str(device).startswith("cuda")
    if isinstance(path_or_model, nn.Module):
        model = path_or_model
        if quantization is None:
            return model
        if on_cuda:
            raise ValueError(
                "bitsandbytes quantizes at load time: pass the model's path instead of a loaded model "
                "(or quantization=None)"
            )
        return quantize_base(model, quantization, exclude)
    path = os.fspath(path_or_model)
    if task == "auto":
        task = task_of_folder(path) if os.path.isdir(path) else "classification"
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if os.path.isdir(path):
        kwargs["local_files_only"] = True
    if task == "classification":
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        if id2label:
            kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
            kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    auto = _auto_class(task)
    if quantization is not None and on_cuda:
        return _load_bitsandbytes(auto, path, quantization, kwargs, exclude)
    with quiet():  # transformers' load report of a new head becomes one line on stderr
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    note = new_head_note(info.get("missing_keys", []), getattr(model.config, "num_labels", None))
    if note and task == "classification":
        print(note, file=sys.stderr)
    if on_cuda:
        model = model.to(device)
    return quantize_base(model, quantization, exclude) if quantization else model


def _load_bitsandbytes(auto: Any, path: str, quantization: str, kwargs: dict, exclude: Optional[Sequence[str]]) -> nn.Module:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"quantization={quantization!r} on CUDA needs bitsandbytes: pip install bitsandbytes"
        ) from error
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    skip = list(HEAD_MODULES) + list(exclude or ())
    if quantization == "int4":
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=skip,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = auto.from_pretrained(path, quantization_config=bnb, device_map={"": torch.cuda.current_device()}, **kwargs)
    # Activation checkpointing is switched on by the training config (through Trainer), not here.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
