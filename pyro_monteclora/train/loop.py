"""``train(model, dataset)``: fit a MonteCLoRA adapter by stochastic variational inference.

Each step draws one adapter from the guide, runs the real forward pass, and takes an AdamW step
on :class:`~pyro_monteclora.train.elbo.ELBOLoss` (negative ELBO per example + cooperative loss)
for A, B, the task head and the variational parameters: the "ELBO as an ``nn.Module`` loss"
idiom of Pyro's ``examples/svi_torch.py``, so no parameter lives in Pyro's global param store.

Example:
    >>> from pyro_monteclora import train
    >>> from pyro_monteclora.testing import tiny_bert, toy_tokenizer
    >>> data = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}] * 8
    >>> result = train(tiny_bert(vocab_size=6), data, tokenizer=toy_tokenizer(["good", "bad"]),
    ...                num_epochs=1, batch_size=4, progress=False)
    >>> len(result.history)
    4
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_scheduler

from ..config import MonteCLoRAConfig
from ..data import (
    Collator,
    DataLike,
    IndexedExamples,
    load_data,
    pad_token_id,
    split_data,
    tokenize_causal_lm,
    tokenize_classification,
)
from ..models.likelihood import IGNORE_INDEX
from ..monteclora import MonteCLoRA, device_of
from .elbo import ELBOLoss

__all__ = ["train", "TrainResult", "evaluate_mean"]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained :class:`~pyro_monteclora.MonteCLoRA` (network, Pyro model and guide).
        history: one dict per step: ``step``, ``epoch``, ``loss``, ``nll``, ``kl``, ``cooperative``
            (per training example) and ``lr``.
        evaluations: one dict per evaluated epoch: ``epoch`` and the mean adapter's metrics on
            the evaluation split (``accuracy`` and ``nll`` per example for classification, ``nll``
            per target token for causal LM).
        config: the configuration of the run.
    """

    model: MonteCLoRA
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    config: Optional[MonteCLoRAConfig] = None


def train(
    model: Any,
    dataset: DataLike,
    config: Optional[MonteCLoRAConfig] = None,
    *,
    tokenizer: Any = None,
    eval_dataset: Optional[DataLike] = None,
    progress: bool = True,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``model`` with a MonteCLoRA adapter on ``dataset``.

    Args:
        model: a transformers ``...ForSequenceClassification`` or ``...ForCausalLM`` model
            (peft adds the adapter in place), or a :class:`MonteCLoRA` to continue training.
        dataset: a ``Dataset``/``DatasetDict``, a list of dicts, or a local JSON/JSONL/CSV path
            (columns: see :mod:`pyro_monteclora.data`).
        config: a :class:`MonteCLoRAConfig`; ``overrides`` replace some of its fields.
        tokenizer: the tokenizer; by default loaded from the model's folder.
        eval_dataset: evaluation data (default: the ``validation``/``test`` split of a
            ``DatasetDict``, if any).
        progress: show a tqdm bar with the loss and its parts.

    With ``config.output_dir`` set, the result is saved there: a merged model by default
    (``merge_adapter=True``), else the adapter alone; the variational posterior either way.

    Given the same seed, two runs on the CPU give identical results. The caller's global torch
    random state is left as it was.
    """
    if isinstance(model, MonteCLoRA):
        config = (config or model.config).replace(**overrides)
    else:
        config = (config or MonteCLoRAConfig()).replace(**overrides)
    if config.output_dir:  # refuse a folder we may not write before spending the training time
        from ..io import check_output_folder

        check_output_folder(os.path.abspath(config.output_dir), overwrite=False)
    device = device_of(model)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed)
        if isinstance(model, MonteCLoRA):
            monteclora = model
        else:
            monteclora = MonteCLoRA.from_model(model, config)
        tokenizer = tokenizer or monteclora.tokenizer or _load_tokenizer(monteclora)
        monteclora.tokenizer = tokenizer
        train_data, eval_data = split_data(load_data(dataset), load_data(eval_dataset) if eval_dataset is not None else None)
        train_examples = _tokenize(monteclora, train_data, tokenizer, config)
        eval_examples = _tokenize(monteclora, eval_data, tokenizer, config) if eval_data is not None and len(eval_data) else None
        result = _fit(monteclora, train_examples, eval_examples, tokenizer, config, progress)
    if config.output_dir:
        from ..io import save_result

        save_result(result, config.output_dir)
    return result


def _load_tokenizer(monteclora: MonteCLoRA) -> Any:
    path = getattr(getattr(monteclora.network, "config", None), "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"no tokenizer found beside the model (name_or_path={path!r}); pass tokenizer=..."
        ) from error


def _tokenize(monteclora: MonteCLoRA, data, tokenizer: Any, config: MonteCLoRAConfig) -> list[dict]:
    if monteclora.task == "classification":
        network_config = monteclora.network.config
        return tokenize_classification(
            data, tokenizer, config.max_length, network_config.num_labels, getattr(network_config, "label2id", None)
        )
    return tokenize_causal_lm(data, tokenizer, config.max_length)


def _loader(examples: list[dict], tokenizer: Any, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        IndexedExamples(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=Collator(pad_token_id(tokenizer)),
    )


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _fit(
    monteclora: MonteCLoRA,
    train_examples: list[dict],
    eval_examples: Optional[list[dict]],
    tokenizer: Any,
    config: MonteCLoRAConfig,
    progress: bool,
) -> TrainResult:
    if getattr(monteclora.network, "is_activation_checkpointing", False):
        raise ValueError(
            "gradient (activation) checkpointing is on: its recomputed forward pass would run after this "
            "step's adapter draw is released and silently use the mean adapter; call "
            "model.gradient_checkpointing_disable() before training"
        )
    device = device_of(monteclora)
    loader = _loader(train_examples, tokenizer, config.batch_size, shuffle=True, seed=config.seed)
    eval_loader = _loader(eval_examples, tokenizer, config.batch_size, False, config.seed) if eval_examples else None
    dataset_size = len(train_examples)
    objective = ELBOLoss(monteclora.model, monteclora.guide, config.kl_weight, config.cooperative_weight)
    parameters = monteclora.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.num_epochs * len(loader)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    result = TrainResult(model=monteclora, config=config)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=total_steps, desc="MonteCLoRA", disable=not progress, dynamic_ncols=True)
    step = 0
    try:
        for epoch in range(config.num_epochs):
            monteclora.train()
            for batch in loader:
                terms = objective(_to(batch, device), dataset_size)
                optimizer.zero_grad(set_to_none=True)
                terms.loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                records.append({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], **terms.detached()})
                bar.update(1)
                if step % config.log_every == 0 or step == total_steps:
                    _check_and_show(records[-1], bar)
            _check_and_show(records[-1], bar)
            if eval_loader is not None and config.eval_every_epoch:
                result.evaluations.append({"epoch": epoch, **evaluate_mean(monteclora, eval_loader)})
                if progress:
                    bar.write(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.evaluations[-1].items() if k != "epoch"))
    finally:
        bar.close()
        monteclora.eval()
        result.history = [{k: float(v) for k, v in r.items()} for r in records]
    return result


def _check_and_show(record: dict[str, Any], bar: tqdm) -> None:
    values = {k: float(record[k]) for k in ("loss", "nll", "kl", "cooperative")}
    if not all(math.isfinite(v) for v in values.values()):
        raise FloatingPointError(
            f"the loss became non-finite by step {record['step']} ({values}); lower learning_rate "
            "or sample_scaler, or check the data"
        )
    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)


@torch.no_grad()
def evaluate_mean(monteclora: MonteCLoRA, loader: DataLoader) -> dict[str, float]:
    """Accuracy and NLL of the mean adapter (per example; per target token for causal LM)."""
    was_training = monteclora.training
    monteclora.eval()
    device = device_of(monteclora)
    total_nll, correct, count = 0.0, 0, 0
    for batch in loader:
        batch = _to(batch, device)
        logits = monteclora.mean_logits(batch).float()
        labels = batch["labels"]
        if monteclora.task == "classification":
            total_nll += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += labels.numel()
        else:
            targets = labels[:, 1:]
            total_nll += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            count += int((targets != IGNORE_INDEX).sum())
    monteclora.train(was_training)
    if monteclora.task == "classification":
        return {"accuracy": correct / count, "nll": total_nll / count}
    return {"nll": total_nll / count}
