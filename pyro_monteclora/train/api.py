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
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from ..config import MonteCLoRAConfig
from ..data.tokenize import DataLike, load_data, pad_token_id, split_data
from ..io.atomic import check_writable, recover_output
from ..io.lock import hold_output, is_main_process
from ..monteclora import MonteCLoRA, device_of
from ..quiet import quiet
from .checkpoints import latest_checkpoint
from .batches import ExampleCollator, ExamplesDataset, tokenize_for, with_likelihood
from .run import Recorder, RunTrainer, check_trained, evaluate_mean, training_arguments
from .sharding import fsdp_launched

__all__ = ["train", "TrainResult", "evaluate_mean"]


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
    verbose: bool = False,
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
        verbose: let transformers, datasets, peft and Pyro log as they are set to; by default
            they are quiet during the call (:func:`pyro_monteclora.quiet.quiet`), so only the
            progress bar, the per-epoch evaluation and warnings about the run are printed.

    With ``config.output_dir`` set, the result is saved there: a merged model by default
    (``merge_adapter=True``), else the adapter alone; the variational posterior either way.
    Checkpoints (``save_steps``) go to ``output_dir/checkpoint-<step>``. A run that diverges
    raises :class:`~pyro_monteclora.train.divergence.TrainingDiverged` and saves nothing. The run
    holds ``output_dir``'s one-writer lock (:func:`pyro_monteclora.io.lock.hold_output`) from
    the start: a second run on the same folder fails at once with
    :class:`~pyro_monteclora.io.lock.OutputLocked`. In a run of several processes the main one
    holds it and writes the output.

    Given the same seed, two runs on the CPU give identical results. The caller's global random
    states (torch, ``random``, numpy) are left as they were.
    """
    base_config = model.monteclora_config if isinstance(model, MonteCLoRA) else MonteCLoRAConfig()
    config = (config or base_config).replace(**overrides)
    if fsdp_launched():
        raise ValueError(
            "pyro_monteclora.train() runs in one process or under DDP, not FSDP (launched with an FSDP config): it "
            "evaluates and saves the whole model after training, which FSDP leaves in shards. Use MonteCLoRATrainer "
            "(docs/training.md, 'More than one device'), or launch with --multi_gpu for DDP."
        )
    main = is_main_process()
    if config.output_dir:  # refuse a folder we may not write (a file, an unwritable parent) before training
        check_writable(config.output_dir, overwrite=False)
    # ... or one that another run writes (the main process holds the lock and writes the output)
    held = hold_output(config.output_dir) if config.output_dir and main else contextlib.nullcontext()
    with held:
        return _train(model, dataset, config, tokenizer, eval_dataset, progress, resume_from_checkpoint, callbacks,
                      verbose, save=main)


def _train(
    model: Any,
    dataset: DataLike,
    config: MonteCLoRAConfig,
    tokenizer: Any,
    eval_dataset: Optional[DataLike],
    progress: bool,
    resume_from_checkpoint: Union[bool, str, None],
    callbacks: Optional[Sequence[TrainerCallback]],
    verbose: bool,
    save: bool,
) -> TrainResult:
    """:func:`train` once its output is checked and held; ``save``: write the output (the main process)."""
    if config.output_dir and save:
        recover_output(config.output_dir)  # what a killed run left: its checkpoints come back, temporaries go
    resume = _resume_path(resume_from_checkpoint, config)
    created = bool(config.output_dir) and not os.path.exists(config.output_dir)
    try:
        with quiet(verbose), _isolated_rng(device_of(model)):
            torch.manual_seed(config.seed)
            monteclora = model if isinstance(model, MonteCLoRA) else MonteCLoRA.from_model(model, config)
            tokenizer = tokenizer or monteclora.tokenizer or _load_tokenizer(monteclora)
            monteclora.tokenizer = tokenizer
            train_data, eval_data = split_data(
                load_data(dataset), load_data(eval_dataset) if eval_dataset is not None else None
            )
            config = with_likelihood(config, monteclora, train_data)  # multiple-choice rows: their likelihood
            monteclora.monteclora_config = config
            monteclora.model.choice_score = config.choice_score  # a MonteCLoRA trained on takes the new setting
            train_examples = tokenize_for(monteclora, train_data, tokenizer, config.max_length)
            eval_examples = tokenize_for(monteclora, eval_data, tokenizer, config.max_length) if eval_data else None
            result = _fit(monteclora, train_examples, eval_examples, tokenizer, config, progress, resume, callbacks)
    except BaseException:
        if created and os.path.isdir(config.output_dir) and not os.listdir(config.output_dir):
            os.rmdir(config.output_dir)  # the empty folder Trainer made for a run that failed
        raise
    if config.output_dir and save:
        from ..io import final_metrics, save_trained

        with quiet(verbose):
            save_trained(result.model, config.output_dir, merge_adapter=config.merge_adapter,
                         metrics=final_metrics(result))
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
    collator = ExampleCollator(pad_token_id(tokenizer))
    eval_loader = (
        DataLoader(ExamplesDataset(eval_examples), batch_size=config.batch_size, collate_fn=collator)
        if eval_examples
        else None
    )
    scratch = None if config.output_dir else tempfile.mkdtemp(prefix="pyro-monteclora-")
    output_dir = os.path.abspath(config.output_dir) if config.output_dir else scratch
    before = {n: p.detach().clone() for n, p in monteclora.named_parameters() if p.requires_grad}
    try:
        trainer = RunTrainer(
            model=monteclora,
            args=training_arguments(config, monteclora.task, output_dir, device),
            train_dataset=ExamplesDataset(train_examples),
            data_collator=collator,
            callbacks=list(callbacks or []),
        )
        trainer.remove_callback(PrinterCallback)
        recorder = Recorder(trainer, eval_loader, progress, config)
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
    check_trained(result, before, resume is not None)
    return result


