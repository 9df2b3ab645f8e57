"""The pieces of :func:`pyro_monteclora.train`: arguments, schedule, progress, evaluation, checks.

- :func:`training_arguments`: a :class:`~pyro_monteclora.MonteCLoRAConfig` as ``TrainingArguments``;
- :func:`lr_lambda`: the learning-rate schedule (no step runs at learning rate 0);
- :class:`RunTrainer`: the Trainer of ``train()`` (AdamW on every trainable tensor, that schedule);
- :class:`Recorder`: per-step history, the progress bar, the evaluation after each epoch;
- :func:`evaluate_mean`: accuracy and NLL of the mean adapter;
- :func:`check_trained`: a run that changed nothing fails; a loss that ended far above its start warns.

Example:
    >>> [round(lr_lambda(k, 2, 6, "linear"), 3) for k in range(6)]
    [0.333, 0.667, 1.0, 0.75, 0.5, 0.25]
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainingArguments

from ..config import MonteCLoRAConfig
from ..models.choices import is_choice_batch
from ..models.likelihood import IGNORE_INDEX
from ..monteclora import MonteCLoRA, device_of
from .trainer import MonteCLoRATrainer

__all__ = ["training_arguments", "lr_lambda", "RunTrainer", "Recorder", "evaluate_mean", "check_trained",
           "LOSS_RISE_FACTOR"]


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
        checkpointing = task == "causal_lm" and config.task != "multiple_choice"  # choices need the prompt's cache
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


class RunTrainer(MonteCLoRATrainer):
    """The Trainer of :func:`train`: AdamW on all trainable tensors, the schedule of :func:`lr_lambda`.

    The variational parameters form their own group at ``guide_learning_rate`` (when set).
    """

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            parameters = self.monteclora.trainable_parameters()
            guide_lr = self.monteclora.monteclora_config.guide_learning_rate
            if guide_lr is not None:
                variational = {id(p) for p in self.monteclora.guide.parameters()}
                parameters = [
                    {"params": [p for p in parameters if id(p) not in variational]},
                    {"params": [p for p in parameters if id(p) in variational], "lr": guide_lr},
                ]
            self.optimizer = torch.optim.AdamW(parameters, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None) -> Any:
        if self.lr_scheduler is None:
            config = self.monteclora.monteclora_config
            warmup = min(math.ceil(config.warmup_ratio * num_training_steps), num_training_steps - 1)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer,
                lambda step: lr_lambda(step, warmup, num_training_steps, config.lr_scheduler),
            )
        return self.lr_scheduler


class Recorder(TrainerCallback):
    """Per-step history, the progress bar and the evaluation after each epoch."""

    def __init__(self, trainer: RunTrainer, eval_loader: Optional[DataLoader], progress: bool, config: MonteCLoRAConfig):
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


#: A run warns when the mean NLL of its last quarter of steps exceeds that of its first quarter by this
#: factor (and, for classification, also exceeds the uniform predictor's NLL, ln(classes)).
LOSS_RISE_FACTOR = 1.5


def check_trained(result: Any, before: dict[str, torch.Tensor], resumed: bool) -> None:
    """Fail if no trainable tensor changed; warn if the loss ended far above where it started."""
    after = dict(result.model.named_parameters())
    if result.history and not resumed and all(torch.equal(before[n], after[n].detach()) for n in before):
        raise RuntimeError(
            f"training ran {len(result.history)} step(s) but changed no trainable tensor (learning rate "
            f"{result.config.learning_rate:g}); nothing was saved: raise learning_rate or train on more data"
        )
    if len(result.history) < 2:
        return
    window = max(1, len(result.history) // 4)  # mean NLL of the first and of the last quarter of the steps
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
    """Accuracy and NLL of the mean adapter (per example; for a causal LM ``nll`` per target token
    and ``nll_per_sequence``, the unit of the training NLL; multiple-choice batches: per row, over
    its choices)."""
    was_training = monteclora.training
    monteclora.eval()
    device = device_of(monteclora)
    total_nll, correct, count, sequences = 0.0, 0, 0, 0
    choices = False
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = monteclora.mean_logits(batch).float()
        labels = batch["labels"]
        choices = is_choice_batch(batch)
        if monteclora.task == "classification" or choices:
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
            sequences += labels.shape[0]
    monteclora.train(was_training)
    if monteclora.task == "classification" or choices:
        return {"accuracy": correct / count, "nll": total_nll / count}
    return {"nll": total_nll / count, "nll_per_sequence": total_nll / sequences}
