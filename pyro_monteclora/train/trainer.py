"""MonteCLoRA on transformers' ``Trainer``: the negative ELBO as the loss, the draw held per step.

:class:`MonteCLoRATrainerMixin` goes in front of ``transformers.Trainer`` or TRL's
``SFTTrainer``; Trainer keeps the loop, accumulation, mixed precision, checkpoints, resume and
processes. What the mixin adds:

- ``compute_loss`` is the negative ELBO plus the cooperative loss
  (:class:`~pyro_monteclora.train.ELBOLoss`), one adapter drawn from the guide per micro-batch
  and process. ``nll``, ``kl`` and ``cooperative`` (per training example) join ``loss`` in
  Trainer's log history.
- The draw stays in the layers until the micro-batch's backward pass has run
  (:class:`~pyro_monteclora.train.draw.HeldDraw`), so activation checkpointing recomputes with
  the drawn adapter.
- Checkpoints and ``save_model`` write the adapter folder of :mod:`pyro_monteclora.io`
  (peft files of the mean, the variational posterior and the MonteCLoRA config), so
  :func:`pyro_monteclora.load` reads any ``checkpoint-<step>``; resuming restores it exactly.
- Divergence stops training with :class:`~pyro_monteclora.train.divergence.TrainingDiverged`
  before anything is saved.

**Loss weighting.** An optimizer step sees ``n`` examples: ``G`` micro-batches (gradient
accumulation) on each of ``W`` processes. The objective of the step is
``sum_i nll_i / n + kl_weight * KL / D + cooperative_weight * cooperative`` (``D`` the
training-set size). Each micro-batch ``b`` of ``n_b`` examples therefore back-propagates

    loss_b = W * (sum_{i in b} nll_i) / n + (kl_weight * KL / D + cooperative_weight * coop_b) / G

Trainer does not rescale it (``loss_is_scaled_for_ga = True``) and DDP averages gradients over
the ``W`` processes, so the accumulated gradient is that of the step's objective: equal to the
single-process, no-accumulation gradient on the same examples with the same draw. ``n`` is
counted by the mixin (examples, summed over the micro-batches and processes of the step), not
taken from Trainer's ``num_items_in_batch``, which counts tokens for causal LMs; the ELBO's
data plate counts examples (sequences). The logged ``loss`` is the step's objective.

Each process draws its own adapter from its own random stream (seeded ``seed`` + process
index), so a step averages ``W * G`` Monte Carlo draws.

Under FSDP2 (``TrainingArguments(fsdp=True, fsdp_config={"version": 2})`` or ``accelerate launch
--config_file`` with ``fsdp_version: 2``) the frozen base and the LoRA factors are sharded per
decoder layer, the guide stays whole on every process, and checkpoints hold whole tensors
(:mod:`pyro_monteclora.train.sharding`); the weighting is the same as under DDP.

Example:
    >>> from transformers import TrainingArguments
    >>> from pyro_monteclora import MonteCLoRA, MonteCLoRATrainer
    >>> from pyro_monteclora.testing import tiny_bert, toy_tokenizer, toy_sentiment
    >>> from pyro_monteclora.train.batches import examples_dataset
    >>> tokenizer = toy_tokenizer(["the", "is", "good", "bad"])
    >>> mc = MonteCLoRA.from_model(tiny_bert(vocab_size=8), lora_r=4)
    >>> data, collator = examples_dataset(mc, toy_sentiment(16), tokenizer, max_length=16)
    >>> args = TrainingArguments("unused", per_device_train_batch_size=8, num_train_epochs=1, report_to="none",
    ...                          use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    >>> trainer = MonteCLoRATrainer(model=mc, args=args, train_dataset=data, data_collator=collator)
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {...}
    >>> sorted(k for k in trainer.state.log_history[0] if k in ("cooperative", "kl", "loss", "nll"))
    ['cooperative', 'kl', 'loss', 'nll']
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import shutil
from typing import Any, Optional

import torch
from accelerate.utils import get_int_from_env
from transformers import Trainer

from ..config import MonteCLoRAConfig
from ..io import save_trained
from ..monteclora import MonteCLoRA
from .checkpoints import restore_adapter_state
from .distributed import check_distributed_type, check_process_count
from .divergence import CAUSES, DivergenceMonitor, TrainingDiverged
from .draw import HeldDraw
from .elbo import ELBOLoss, LossTerms
from .kl_schedule import kl_factor
from .sharding import (
    ShardView, all_reduce_min, configure_plugin, enable_fsdp_on_cpu, fsdp_version, full_parameters, load_optimizer,
    local_tensor, requested_fsdp_plugin, save_optimizer, separate_groups,
)

__all__ = ["MonteCLoRATrainerMixin", "MonteCLoRATrainer", "micro_batch_weights"]

TERMS = ("nll", "kl", "cooperative")
_WORLD_SIZE_VARIABLES = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]  # as accelerate reads them


def micro_batch_weights(step_examples: int, world_size: int, accumulation_steps: int) -> tuple[float, float]:
    """The weights ``(w_nll, w_reg)`` of a micro-batch: ``loss_b = w_nll * sum nll_i + w_reg * reg_b``.

    ``w_nll = W / n`` and ``w_reg = 1 / G`` (see the module docstring).

    Example:
        >>> micro_batch_weights(step_examples=32, world_size=2, accumulation_steps=4)
        (0.0625, 0.25)
    """
    if step_examples <= 0 or world_size <= 0 or accumulation_steps <= 0:
        raise ValueError(
            f"step_examples, world_size and accumulation_steps must be positive, got "
            f"{step_examples}, {world_size}, {accumulation_steps}"
        )
    return world_size / step_examples, 1.0 / accumulation_steps


class MonteCLoRATrainerMixin:
    """Put in front of ``transformers.Trainer`` (or TRL's ``SFTTrainer``) to train MonteCLoRA.

    Args (keyword, besides the Trainer's own):
        model: a :class:`~pyro_monteclora.MonteCLoRA`, or a transformers model to which an
            adapter is attached with ``monteclora_config``.
        monteclora_config: the :class:`~pyro_monteclora.MonteCLoRAConfig` for a transformers
            ``model`` (ignored for a MonteCLoRA, which carries its own).
        dataset_size: ``D`` of the ELBO, the number of training examples (default:
            ``len(train_dataset)``).

    Batches are the model's inputs plus ``labels`` (and optionally ``index``, the examples'
    positions in the dataset). See the module docstring for the loss weighting rule.
    """

    def __init__(
        self,
        *args: Any,
        monteclora_config: Optional[MonteCLoRAConfig] = None,
        dataset_size: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and not isinstance(model, MonteCLoRA):
            model = MonteCLoRA.from_model(model, monteclora_config or MonteCLoRAConfig())
            if args:
                args = (model,) + tuple(args[1:])
            else:
                kwargs["model"] = model
        if not isinstance(model, MonteCLoRA):
            raise TypeError("MonteCLoRATrainer needs model=: a MonteCLoRA or a transformers model")
        super().__init__(*args, **kwargs)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        check_distributed_type(str(self.accelerator.distributed_type), self.is_deepspeed_enabled, self.is_fsdp_enabled,
                               fsdp_version(plugin) if plugin is not None else 2)
        check_process_count(get_int_from_env(_WORLD_SIZE_VARIABLES, 1), self.accelerator.num_processes)
        self.monteclora: MonteCLoRA = model
        config = model.monteclora_config
        if plugin is not None:  # the guide stays whole on every process; the network is sharded
            configure_plugin(plugin, model.guide, column_kl=config.column_prior or config.variant == "learned")
        self.loss_is_scaled_for_ga = True
        self.elbo = ELBOLoss(model.model, model.guide, config.kl_weight, config.cooperative_weight,
                             column_prior=config.column_prior,
                             prior_std=config.prior_std if config.variant == "learned" else None)
        self.held_draw = HeldDraw(model.groups)
        self.divergence = DivergenceMonitor()
        self._dataset_size = dataset_size
        self._step_examples: Optional[int] = None
        self._micro_terms: list[dict[str, torch.Tensor]] = []  # this optimizer step's micro-batches
        self._logged_steps: list[dict[str, torch.Tensor]] = []  # steps since the last log record
        self.step_terms: dict[str, torch.Tensor] = {}  # the last step's terms, averaged over its micro-batches

    def create_accelerator_and_postprocess(self) -> None:
        """Trainer's accelerator; FSDP2 asked for on CPUs, which accelerate drops, is turned on."""
        super().create_accelerator_and_postprocess()
        if not self.is_fsdp_enabled and self.accelerator.num_processes > 1:
            plugin = requested_fsdp_plugin(self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, plugin)

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.is_fsdp_enabled:  # the guide stays plain tensors, the rest become DTensors: separate groups
            separate_groups(optimizer, self.monteclora.guide.parameters())
        return optimizer

    # --- the objective ------------------------------------------------------------------------

    @property
    def dataset_size(self) -> int:
        """``D``: the number of training examples the ELBO's data plate stands for."""
        if self._dataset_size is None:
            if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
                raise ValueError("pass dataset_size= to the trainer: the training dataset has no length")
            self._dataset_size = len(self.train_dataset)
        return self._dataset_size

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        local = sum(_batch_size(b) for b in batch_samples)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(torch.tensor(local, device=self.accelerator.device), "sum")
            local = int(total)
        self._step_examples = local
        return batch_samples, num_items_in_batch

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Training: the weighted negative ELBO + cooperative loss of one draw. Evaluation: the
        mean adapter's own loss (the network's ``loss`` output)."""
        if not model.training:
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        batch = dict(inputs)
        self.elbo.kl_weight = self._kl_weight(self.state.global_step + 1)
        local = _batch_size(batch)
        step_examples = self._step_examples or local * self.current_gradient_accumulation_steps
        w_nll, w_reg = micro_batch_weights(
            step_examples, self.accelerator.num_processes, self.current_gradient_accumulation_steps
        )
        try:
            terms = model(objective=functools.partial(self._objective, regularizer_weight=w_reg), **batch)
        except ValueError as error:
            self._diverged_in_forward(self.state.global_step + 1, error)
            raise
        regularizer = w_reg * (self.elbo.kl_weight * terms.kl + self.elbo.cooperative_weight * terms.cooperative)
        loss = w_nll * terms.nll * local + regularizer  # the regularizer is detached: see _objective
        step = self.state.global_step + 1
        detached = terms.detached()
        self.divergence.record_terms(step, {k: detached[k] for k in TERMS})
        self._micro_terms.append({k: detached[k] for k in ("loss",) + TERMS})
        return (loss, detached) if return_outputs else loss

    def _kl_weight(self, step: int) -> float:
        """``kl_weight`` times the config's KL schedule at optimizer step ``step``."""
        config = self.monteclora.monteclora_config
        if config.kl_schedule == "constant":
            return config.kl_weight
        epochs = max(1, math.ceil(self.args.num_train_epochs)) if self.args.max_steps <= 0 else 1
        per_epoch = max(1, math.ceil(self.state.max_steps / epochs))
        return config.kl_weight * kl_factor(config.kl_schedule, step, per_epoch)

    def _objective(self, batch: dict[str, Any], regularizer_weight: float) -> LossTerms:
        """The ELBO terms of one draw, run inside the model's ``forward`` (so under DDP).

        Only ``nll`` has a graph, which reaches A, B and the head, and the held draw's leaves.
        The guide's side (its draw, the KL, the cooperative loss) is computed without one, and
        its gradient comes in :meth:`training_step` from the same draw made again with its
        graph (:meth:`ELBOLoss.guide_terms`); so DDP sees the variational parameters as unused
        by this backward pass, and the draw's graph is not kept during the network's backward.
        """
        terms = self.elbo(batch, self.dataset_size, self.held_draw)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16: the network's gradients are scaled too
        scale = regularizer_weight * (scaler.get_scale() if scaler is not None else 1.0)

        def redraw() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            noise, kl, cooperative = self.elbo.guide_terms(self.dataset_size)
            return noise, scale * (self.elbo.kl_weight * kl + self.elbo.cooperative_weight * cooperative)

        self.held_draw.remember(redraw)
        return LossTerms(loss=terms.loss.detach(), nll=terms.nll, kl=terms.kl, cooperative=terms.cooperative)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Trainer's step (forward, backward), then the chain rule from the held draw to the guide."""
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
            reached = list(self.monteclora.guide.parameters()) + self.elbo.column_parameters()
            self.held_draw.backward_to_guide(reached, self._average)
            if self.accelerator.sync_gradients:  # the step's last micro-batch: its gradients are complete
                self.divergence.record_gradients(self.state.global_step + 1, self._trainable(local=True))
                self.step_terms = _mean(self._micro_terms)
                self._logged_steps.append(self.step_terms)
                self._micro_terms = []
        finally:
            self.held_draw.release()
        return loss

    def _average(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.accelerator.num_processes == 1:
            return grads
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, "mean")
        return [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in grads]), grads)]

    # --- logging and divergence ---------------------------------------------------------------

    def _trainable(self, local: bool = False) -> list[tuple[str, Any]]:
        """Trainable tensors, named as in the transformers model (``bert.encoder...lora_A...``);
        ``local``: this process's shards under FSDP (tensors whose ``.grad`` is the shard's)."""
        prefix = "model.network.base_model.model."
        return [(n[len(prefix):] if n.startswith(prefix) else n, ShardView(p) if local else p)
                for n, p in self.monteclora.named_parameters() if p.requires_grad]

    def _check_divergence(self, step: Optional[int] = None, synchronize: bool = True) -> None:
        """Raise :class:`TrainingDiverged` if training diverged; ``synchronize``: merge the records of every
        process first (all must call it then), so that all of them raise together."""
        if synchronize and self.accelerator.num_processes > 1:
            self.divergence.merge(all_reduce_min)
        supports = {}
        for name, posterior in self.monteclora.guide.posteriors.items():
            supports[f"guide.{name}.concentration"] = posterior.concentration
            supports[f"guide.{name}.scale_diag"] = posterior.scale_diag
        parameters = {n: local_tensor(p) for n, p in self._trainable()}
        self.divergence.check(parameters, supports, self.state.global_step if step is None else step)

    def _diverged_in_forward(self, step: int, error: ValueError) -> None:
        """Turn a distribution's validation error on a non-finite value into :class:`TrainingDiverged`."""
        self._check_divergence(step, synchronize=False)  # names the parameter or support that went bad, if one did
        text = str(error)
        if "Expected parameter" in text and "invalid values" in text:
            term = "the nll term (the network's logits)" if "Categorical" in text else "a variational parameter"
            raise TrainingDiverged(f"training diverged at step {step}: {term} became non-finite; {CAUSES}") from None

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._logged_steps:
            self._check_divergence()
            for k, value in _mean(self._logged_steps).items():
                if k in TERMS:
                    if self.accelerator.num_processes > 1:
                        value = self.accelerator.reduce(value.to(self.accelerator.device), "mean")
                    logs[k] = float(value)
            self._logged_steps = []
        super().log(logs, start_time)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.accelerator.num_processes > 1:  # a draw of its own on each process
            # ... but one order of the examples: accelerate's sampler seeds from the global seed unless given one
            if self.accelerator.dataloader_config.data_seed is None:
                self.accelerator.dataloader_config.data_seed = self.args.seed
            torch.manual_seed(self.args.seed + self.accelerator.process_index)
        output = super().train(*args, **kwargs)
        self._check_divergence()
        return output

    # --- files --------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            forward = self.monteclora.network.get_base_model().forward
            self._signature_columns = list(inspect.signature(forward).parameters) + ["label", "labels", "index"]

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Write the adapter folder (peft files of the mean, posterior, config) and the tokenizer."""
        self._check_divergence()
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_trained(self.monteclora, output_dir, checkpoint=True, tokenizer=self.processing_class)
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as handle:
            handle.write(self.args.to_json_string())

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Trainer's ``save_model``; under FSDP every process gathers the trainable tensors whole, then the
        main process writes the same adapter folder as one process would."""
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        with full_parameters(self.monteclora):
            self._save(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_optimizer(self.model, self.optimizer, self.lr_scheduler, output_dir, write=self.args.should_save)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if not self.is_fsdp_enabled or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_optimizer(self.model, self.optimizer, self.lr_scheduler, checkpoint)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Trainer's checkpoint; an interrupted write (an exception, Ctrl-C) removes the partial folder."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        existed = os.path.exists(folder)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if not existed and self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        with full_parameters(self.monteclora, write_back=True):  # under FSDP: loaded whole, then into the shards
            restore_adapter_state(self.monteclora, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint:
            with full_parameters(self.monteclora, write_back=True):
                restore_adapter_state(self.monteclora, self.state.best_model_checkpoint)


class MonteCLoRATrainer(MonteCLoRATrainerMixin, Trainer):
    """``transformers.Trainer`` training a MonteCLoRA adapter (see :class:`MonteCLoRATrainerMixin`)."""


def _mean(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


def _batch_size(batch: Any) -> int:
    for key in ("input_ids", "labels", "inputs_embeds"):
        value = batch.get(key) if isinstance(batch, dict) else None
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError(f"cannot tell the batch size: a batch needs input_ids or labels, got keys {sorted(batch)}")
