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

The work is split by job: :mod:`~pyro_monteclora.io.format` (file names, the JSON record, the
:class:`AdapterModel` shape io reads), :mod:`~pyro_monteclora.io.atomic` (the output-folder rule,
atomic replacement, the finiteness check), :mod:`~pyro_monteclora.io.save` (writing),
:mod:`~pyro_monteclora.io.read` (reading and checking), :mod:`~pyro_monteclora.io.lock` (one writer
per output) and :mod:`~pyro_monteclora.io.model_card`.
io sits below the core: it never imports :class:`~pyro_monteclora.MonteCLoRA`;
:func:`pyro_monteclora.load` (in :mod:`pyro_monteclora.monteclora`) builds one from what
:func:`read_adapter` returns. ``pyro_monteclora.io.load`` stays as an alias of it for a release.

Example:
    >>> import tempfile, torch
    >>> from pyro_monteclora import MonteCLoRA, load
    >>> from pyro_monteclora.io import save_pretrained
    >>> from pyro_monteclora.testing import tiny_bert
    >>> mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    >>> folder = save_pretrained(mc, tempfile.mkdtemp() + "/adapter")
    >>> again = load(tiny_bert(), folder)
    >>> batch = {"input_ids": torch.tensor([[1, 5, 2]])}
    >>> torch.equal(mc.mean_logits(batch), again.mean_logits(batch))
    True
"""

from __future__ import annotations

from .atomic import check_finite, check_output_folder
from .format import (
    ADAPTER_SUBFOLDER,
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    FORMAT_VERSION,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    PICKLE_SUFFIXES,
    POSTERIOR_NAME,
    AdapterModel,
    PathLike,
)
from .lock import OutputLocked, hold_output
from .read import SavedAdapter, adapter_folder, check_model_path, read_adapter, read_metadata, restore_adapter
from .save import final_metrics, merged_state_dict, save_merged, save_pretrained, save_result, save_trained

__all__ = [
    "save_pretrained",
    "save_merged",
    "save_result",
    "read_adapter",
    "restore_adapter",
    "SavedAdapter",
    "AdapterModel",
    "merged_state_dict",
    "adapter_folder",
    "read_metadata",
    "save_trained",
    "final_metrics",
    "check_finite",
    "check_output_folder",
    "check_model_path",
    "OutputLocked",
    "hold_output",
    "CONFIG_NAME",
    "POSTERIOR_NAME",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "ADAPTER_SUBFOLDER",
    "CHECKPOINT_PREFIX",
    "FORMAT_VERSION",
    "PICKLE_SUFFIXES",
    "PathLike",
]


def __getattr__(name: str) -> object:
    """``pyro_monteclora.io.load``, the old home of :func:`pyro_monteclora.load` (kept for a release)."""
    if name == "load":
        import importlib

        return importlib.import_module("pyro_monteclora.monteclora").load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
