"""Merge a saved MonteCLoRA adapter's mean into its base model: a plain transformers model.

The merged weights are ``W + (alpha / r) B A`` for every adapted layer plus the trained task
head, so the merged model's outputs equal the adapter's mean outputs (to float rounding). The
result is saved as safetensors with the tokenizer and a model card, or pushed to the Hub.

Example:
    >>> from pyro_monteclora.export.merge import merge
    >>> merge("path/to/base", "path/to/adapter", output_folder="merged")   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from typing import Any, Optional

from ..io import adapter_folder, check_model_path, hold_output, read_metadata, save_merged
from ..monteclora import load
from ..quantization import load_base_model

__all__ = ["merge", "push_folder"]


def _tokenizer(adapter_path: str, base_model_path: str) -> Any:
    from transformers import AutoTokenizer

    folder = adapter_folder(adapter_path)
    for candidate in (folder, adapter_path, base_model_path):
        if os.path.isfile(os.path.join(candidate, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(candidate, local_files_only=True)
    if not os.path.isdir(base_model_path):
        return AutoTokenizer.from_pretrained(base_model_path)
    return None


def _base_is_quantized(base_model_path: str) -> bool:
    path = os.path.join(base_model_path, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as handle:
        return "quantization_config" in json.load(handle)


def merge(
    base_model_path: str,
    adapter_path: str,
    output_folder: Optional[str] = None,
    push_to_hub: Optional[str] = None,
    *,
    token: Optional[str] = None,
    pad_to_multiple_of: Optional[int] = None,
    overwrite: bool = False,
    private: bool = True,
) -> str:
    """Merge the adapter in ``adapter_path`` into the base model at ``base_model_path``.

    Args:
        base_model_path: folder (or hub id) of the base model the adapter was trained on.
        adapter_path: a pyro-monteclora adapter folder or output folder.
        output_folder: where to save the merged model; exactly one of it and ``push_to_hub``.
        push_to_hub: a Hub repository id to upload the merged model to.
        token: Hub token (default: the one ``huggingface_hub`` finds); never printed.
        pad_to_multiple_of: when the tokenizer has more tokens than the base model's embeddings,
            resize them to the next multiple of this number (GPU-friendly sizes).
        overwrite: replace a non-empty output folder that is not a pyro-monteclora output.
        private: create the Hub repository as private.

    Returns the output folder or the Hub repository id. The output folder's one-writer lock is held
    from the start: a second writer is refused before any work
    (:class:`~pyro_monteclora.io.lock.OutputLocked`).
    """
    if (output_folder is None) == (push_to_hub is None):
        raise ValueError("give exactly one of an output folder (--output-folder) or a Hub repo (--push-to-hub)")
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    with hold_output(output_folder) if output_folder is not None else contextlib.nullcontext():
        return _merge(base_model_path, adapter_path, output_folder, push_to_hub, token=token,
                      pad_to_multiple_of=pad_to_multiple_of, overwrite=overwrite, private=private)


def _merge(
    base_model_path: str,
    adapter_path: str,
    output_folder: Optional[str],
    push_to_hub: Optional[str],
    *,
    token: Optional[str],
    pad_to_multiple_of: Optional[int],
    overwrite: bool,
    private: bool,
) -> str:
    meta = read_metadata(adapter_path)
    check_model_path(base_model_path)
    trained_on = meta["config"].get("quantization")
    if trained_on or _base_is_quantized(base_model_path):
        warnings.warn(
            f"merging into a quantized base ({trained_on or 'quantized checkpoint'}): the merged model holds "
            "full-precision weights (base + adapter), so its outputs differ slightly from those of the "
            "quantized model the adapter was trained on",
            stacklevel=3,  # the caller of merge()
        )
    tokenizer = _tokenizer(adapter_path, base_model_path)
    base = load_base_model(
        base_model_path,
        meta["task"],
        None,
        num_labels=meta.get("num_labels"),
        id2label=meta.get("id2label"),
        device="cpu",
    )
    if pad_to_multiple_of is not None and tokenizer is not None:
        size = base.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > size:
            base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    monteclora = load(base, adapter_path, tokenizer=tokenizer, device="cpu")
    metrics = meta.get("metrics") or None
    if output_folder is not None:
        return save_merged(monteclora, output_folder, metrics=metrics, overwrite=overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_merged(monteclora, os.path.join(tmp, "merged"), metrics=metrics)
        return push_folder(folder, push_to_hub, token=token, private=private)


def push_folder(folder: str, repo_id: str, *, token: Optional[str] = None, private: bool = True) -> str:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if missing)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Upload MonteCLoRA merged model")
    return repo_id
