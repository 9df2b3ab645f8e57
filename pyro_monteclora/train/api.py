"""``train(model, dataset)``: fit a MonteCLoRA adapter by SVI on transformers' ``Trainer``.

A thin layer over :class:`~pyro_monteclora.MonteCLoRATrainer`: it builds the adapter, tokenizes
the data once, maps :class:`~pyro_monteclora.MonteCLoRAConfig` onto ``TrainingArguments``,
shows a progress bar with the loss parts, evaluates the mean adapter after each epoch and
saves the result. Each step draws one adapter from the guide per micro-batch and process and
takes an AdamW step on the negative ELBO + cooperative loss for A, B, the task head and the
variational parameters; nothing lives in Pyro's global param store.

Example:
    >>> from pyro_monteclora import train
    >>> from pyro_monteclora.testing import tiny_bert, toy_tokenizer
    >>> data = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}] * 8
    >>> result = train(tiny_bert(vocab_size=6), data, tokenizer=toy_tokenizer(["good", "bad"]),
    ...                num_epochs=1, batch_size=4, progress=False)
    >>> len(result.history), sorted(result.history[-1])
    (4, ['cooperative', 'epoch', 'kl', 'loss', 'lr', 'nll', 'step'])
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from ..config import MonteCLoRAConfig
from ..data import DataLike, load_data, split_data
from ..models.likelihood import IGNORE_INDEX
from ..monteclora import MonteCLoRA, device_of
from .checkpoints import latest_checkpoint
from .data import ExampleCollator, ExamplesDataset, tokenize_for
from .trainer import MonteCLoRATrainer

__all__ = ["train", "TrainResult", "evaluate_mean", "training_arguments", "lr_lambda"]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained :class:`~pyro_monteclora.MonteCLoRA` (network, Pyro model and guide).
        history: one dict per optimizer step: ``step``, ``epoch`` (fractional, as Trainer's),
            ``loss``, ``nll``, ``kl``, ``cooperative`` (per training example, averaged over the
            step's micro-batches) and ``lr`` (the learning rate the step used).
        evaluations: one dict per evaluated epoch: ``epoch`` and the mean adapter's metrics on
            the evaluation split (``accuracy`` and ``nll`` per example for classification, ``nll``
            per target token for causal LM).
        config: the configuration of the run.
        warnings: problems found after training (such as a loss that ended far above where it
            started); each was also issued as a ``UserWarning``.
        log_history: Trainer's log records (every ``log_every`` steps), with the loss parts.
    """

    model: MonteCLoRA
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    config: Optional[MonteCLoRAConfig] = None
    warnings: list[str] = field(default_factory=list)
    log_history: list[dict[str, float]] = field(default_factory=list)


def train(
    model: Any,
    dataset: DataLike,
    config: Optional[MonteCLoRAConfig] = None,
    *,
    tokenizer: Any = None,
    eval_dataset: Optional[DataLike] = None,
    progress: bool = True,
    resume_from_checkpoint: Union[bool, str, None] = None,
    callbacks: Optional[Sequence[TrainerCallback]] = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``model`` with a MonteCLoRA adapter on ``dataset``.

    Args:
        model: a transformers ``...ForSequenceClassification`` or ``...ForCausalLM`` model
            (peft adds the adapter in place), or a :class:`MonteCLoRA` to continue training.
            The model object is the caller's: a new classification head it already holds was
            drawn when the caller built it; ``seed`` covers what ``train`` creates (the
            adapter's initialization, the data order, the draws, dropout).
        dataset: a ``Dataset``/``DatasetDict``, a list of dicts, or a local JSON/JSONL/CSV path
            (columns: see :mod:`pyro_monteclora.data`).
        config: a :class:`MonteCLoRAConfig`; ``overrides`` replace some of its fields.
        tokenizer: the tokenizer; by default loaded from the model's folder.
        eval_dataset: evaluation data (default: the ``validation``/``test`` split of a
            ``DatasetDict``, if any).
        progress: show a tqdm bar with the loss and its parts (on stderr).
        resume_from_checkpoint: ``True`` for the newest complete ``checkpoint-<step>`` in
            ``output_dir``, or the path of one. The run then continues exactly where that
            checkpoint stopped.
        callbacks: ``transformers.TrainerCallback``s, passed to the Trainer.

    With ``config.output_dir`` set, the result is saved there: a merged model by default
    (``merge_adapter=True``), else the adapter alone; the variational posterior either way.
    Checkpoints (``save_steps``) go to ``output_dir/checkpoint-<step>``. A run that diverges
    raises :class:`~pyro_monteclora.train.divergence.TrainingDiverged` and saves nothing.

    Given the same seed, two runs on the CPU give identical results. The caller's global random
    states (torch, ``random``, numpy) are left as they were.
    """
    base_config = model.monteclora_config if isinstance(model, MonteCLoRA) else MonteCLoRAConfig()
    config = (config or base_config).replace(**overrides)
    if config.output_dir:  # refuse a folder we may not write before spending the training time
        from ..io import check_output_folder

        check_output_folder(os.path.abspath(config.output_dir), overwrite=False)
    resume = _resume_path(resume_from_checkpoint, config)
    with _isolated_rng(device_of(model)):
        torch.manual_seed(config.seed)
        monteclora = model if isinstance(model, MonteCLoRA) else MonteCLoRA.from_model(model, config)
        monteclora.monteclora_config = config
        tokenizer = tokenizer or monteclora.tokenizer or _load_tokenizer(monteclora)
        monteclora.tokenizer = tokenizer
        train_data, eval_data = split_data(
            load_data(dataset), load_data(eval_dataset) if eval_dataset is not None else None
        )
        train_examples = tokenize_for(monteclora, train_data, tokenizer, config.max_length)
        eval_examples = tokenize_for(monteclora, eval_data, tokenizer, config.max_length) if eval_data else None
        result = _fit(monteclora, train_examples, eval_examples, tokenizer, config, progress, resume, callbacks)
    if config.output_dir:
        from ..io import save_result

        save_result(result, config.output_dir)
    return result


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Run with the caller's torch, ``random`` and numpy states restored afterwards (Trainer seeds all three)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _resume_path(resume: Union[bool, str, None], config: MonteCLoRAConfig) -> Optional[str]:
    if resume is None or resume is False:
        return None
    if resume is True:
        if not config.output_dir:
            raise ValueError("resume_from_checkpoint=True needs output_dir, the folder holding the checkpoints")
        path = latest_checkpoint(os.path.abspath(config.output_dir))
        if path is None:
            raise FileNotFoundError(
                f"no complete checkpoint-<step> folder in {config.output_dir!r} to resume from; "
                "pass the path of one, or train without resume_from_checkpoint"
            )
        return path
    path = os.fspath(resume)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    return path


def _load_tokenizer(monteclora: MonteCLoRA) -> Any:
    path = getattr(getattr(monteclora.network, "config", None), "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"no tokenizer found beside the model (name_or_path={path!r}); pass tokenizer=..."
        ) from error


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The learning-rate factor of optimizer step ``step`` (from 0); never 0 for a step that runs.

    Warm-up step ``k < warmup_steps`` uses ``(k + 1) / (warmup_steps + 1)``; afterwards
    ``"constant"`` keeps 1, ``"linear"`` decays as ``(total - k) / (total - warmup)`` and
    ``"cosine"`` as ``0.5 (1 + cos(pi (k - warmup) / (total - warmup)))``, which both stay
    above 0 for ``k < total``.

    Example:
        >>> [round(lr_lambda(k, 2, 6, "linear"), 3) for k in range(6)]
        [0.333, 0.667, 1.0, 0.75, 0.5, 0.25]
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    remaining = max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / remaining
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def training_arguments(config: MonteCLoRAConfig, task: str, output_dir: str, device: torch.device) -> TrainingArguments:
    """``TrainingArguments`` carrying a :class:`MonteCLoRAConfig`'s training knobs."""
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        checkpointing = task == "causal_lm"
    if config.mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a CUDA GPU; on the CPU use mixed_precision='bf16'")
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm or 0.0,
        logging_strategy="steps",
        logging_steps=config.log_every,
        logging_nan_inf_filter=False,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        bf16=config.mixed_precision == "bf16",
        fp16=config.mixed_precision == "fp16",
        activation_checkpointing=bool(checkpointing),
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        dataloader_num_workers=0,
        log_level="error",
    )


class _Trainer(MonteCLoRATrainer):
    """The Trainer of :func:`train`: AdamW on all trainable tensors, the schedule of :func:`lr_lambda`."""

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            parameters = self.monteclora.trainable_parameters()
            self.optimizer = torch.optim.AdamW(parameters, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None) -> Any:
        if self.lr_scheduler is None:
            config = self.monteclora.monteclora_config
            warmup = math.ceil(config.warmup_ratio * num_training_steps)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer,
                lambda step: lr_lambda(step, warmup, num_training_steps, config.lr_scheduler),
            )
        return self.lr_scheduler


class _Recorder(TrainerCallback):
    """Per-step history, the progress bar and the evaluation after each epoch."""

    def __init__(self, trainer: _Trainer, eval_loader: Optional[DataLoader], progress: bool, config: MonteCLoRAConfig):
        self.trainer = trainer
        self.eval_loader = eval_loader
        self.config = config
        self.records: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, float]] = []
        self.bar: Optional[tqdm] = None
        self.progress = progress

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - Trainer's signature
        self.bar = tqdm(
            total=state.max_steps, initial=state.global_step, desc="MonteCLoRA", disable=not self.progress,
            dynamic_ncols=True, file=sys.stderr,
        )

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        terms = self.trainer.step_terms
        self.records.append({"step": state.global_step, "epoch": state.epoch, "lr": self._used_lr, **terms})
        if self.bar is not None:
            self.bar.update(1)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        scheduler = self.trainer.lr_scheduler
        self._used_lr = scheduler.get_last_lr()[0] if scheduler is not None else args.learning_rate

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "nll", "kl", "cooperative") if k in logs},
                                 refresh=False)

    def on_epoch_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.eval_loader is None or not self.config.eval_every_epoch:
            return
        epoch = len(self.evaluations)
        self.evaluations.append({"epoch": epoch, **evaluate_mean(self.trainer.monteclora, self.eval_loader)})
        if self.progress and self.bar is not None:
            values = ", ".join(f"{k}={v:.4f}" for k, v in self.evaluations[-1].items() if k != "epoch")
            self.bar.write(f"epoch {epoch}: {values}", file=sys.stderr)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.close()


def _fit(
    monteclora: MonteCLoRA,
    train_examples: list[dict],
    eval_examples: Optional[list[dict]],
    tokenizer: Any,
    config: MonteCLoRAConfig,
    progress: bool,
    resume: Optional[str],
    callbacks: Optional[Sequence[TrainerCallback]],
) -> TrainResult:
    device = device_of(monteclora)
    collator = ExampleCollator(_pad(tokenizer))
    eval_loader = (
        DataLoader(ExamplesDataset(eval_examples), batch_size=config.batch_size, collate_fn=collator)
        if eval_examples
        else None
    )
    scratch = None if config.output_dir else tempfile.mkdtemp(prefix="pyro-monteclora-")
    output_dir = os.path.abspath(config.output_dir) if config.output_dir else scratch
    before = {n: p.detach().clone() for n, p in monteclora.named_parameters() if p.requires_grad}
    try:
        trainer = _Trainer(
            model=monteclora,
            args=training_arguments(config, monteclora.task, output_dir, device),
            train_dataset=ExamplesDataset(train_examples),
            data_collator=collator,
            callbacks=list(callbacks or []),
        )
        trainer.remove_callback(PrinterCallback)
        recorder = _Recorder(trainer, eval_loader, progress, config)
        trainer.add_callback(recorder)
        try:
            trainer.train(resume_from_checkpoint=resume)
        finally:
            if recorder.bar is not None:
                recorder.bar.close()
            monteclora.eval()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    history = [{k: float(v) for k, v in r.items()} for r in recorder.records]
    result = TrainResult(
        model=monteclora,
        history=history,
        evaluations=recorder.evaluations,
        config=config,
        log_history=list(trainer.state.log_history),
    )
    _check_trained(result, before, resume is not None)
    return result


def _pad(tokenizer: Any) -> int:
    from ..data import pad_token_id

    return pad_token_id(tokenizer)


#: A run warns when its final NLL exceeds its first NLL by this factor (and, for classification,
#: also exceeds the uniform predictor's NLL, ln(classes)).
LOSS_RISE_FACTOR = 1.5


def _check_trained(result: TrainResult, before: dict[str, torch.Tensor], resumed: bool) -> None:
    """Fail if no trainable tensor changed; warn if the loss ended far above where it started."""
    after = dict(result.model.named_parameters())
    if result.history and not resumed and all(torch.equal(before[n], after[n].detach()) for n in before):
        raise RuntimeError(
            f"training ran {len(result.history)} step(s) but changed no trainable tensor (learning rate "
            f"{result.config.learning_rate:g}); nothing was saved: raise learning_rate or train on more data"
        )
    if len(result.history) < 2:
        return
    window = max(1, len(result.history) // 10)
    first = sum(r["nll"] for r in result.history[:window]) / window
    last = sum(r["nll"] for r in result.history[-window:]) / window
    limit = LOSS_RISE_FACTOR * first
    if result.model.task == "classification":
        limit = max(limit, math.log(result.model.network.config.num_labels))
    if last > limit:
        message = (
            f"the training NLL ended at {last:.4g}, far above where it started ({first:.4g}): the run "
            f"probably diverged; lower learning_rate (now {result.config.learning_rate:g})"
        )
        result.warnings.append(message)
        warnings.warn(message, UserWarning, stacklevel=3)


@torch.no_grad()
def evaluate_mean(monteclora: MonteCLoRA, loader: DataLoader) -> dict[str, float]:
    """Accuracy and NLL of the mean adapter (per example; per target token for causal LM)."""
    was_training = monteclora.training
    monteclora.eval()
    device = device_of(monteclora)
    total_nll, correct, count = 0.0, 0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
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
