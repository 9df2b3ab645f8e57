"""The one configuration of a MonteCLoRA fine-tune: LoRA knobs, MonteCLoRA knobs, training knobs.

Every default of the package lives here and nowhere else. Invalid values raise ``ValueError``
naming the field and the value.

Example:
    >>> from pyro_monteclora import MonteCLoRAConfig
    >>> config = MonteCLoRAConfig(lora_r=8, num_components=4)
    >>> config.replace(learning_rate=1e-3).learning_rate
    0.001
    >>> MonteCLoRAConfig(lora_r=0)
    Traceback (most recent call last):
    ...
    ValueError: lora_r must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

TASKS = ("auto", "classification", "causal_lm", "multiple_choice")
#: What a multiple-choice row's choice scores are (:mod:`pyro_monteclora.models.choices`).
CHOICE_SCORES = ("sum", "per_char")
SCHEDULERS = ("constant", "linear", "cosine")
QUANTIZATIONS = (None, "int4", "int8")
MIXED_PRECISIONS = (None, "bf16", "fp16")
#: The parameterizations of the posterior: the paper's fixed width, or a width the ELBO learns.
VARIANTS = ("paper", "learned")
#: How the KL is weighted from step to step (:mod:`pyro_monteclora.train.kl_schedule`).
KL_SCHEDULES = ("constant", "blob")


@dataclass
class MonteCLoRAConfig:
    """Settings of a MonteCLoRA adapter and of its training.

    Args:
        lora_r: LoRA rank r (the common fine-tuning default). Also the dimension of the Wishart
            covariance of the stochastic columns of A.
        lora_alpha: LoRA scale numerator; the adapter update is ``(alpha / r) * B @ A``.
        lora_dropout: dropout on the input of the LoRA branch, as in peft.
        target_modules: which linear layers get an adapter: ``"all-linear"`` (peft resolves it:
            every linear layer but the output head), a list of module-name suffixes, or a regex.
        modules_to_save: extra modules trained in full (point estimates). ``None`` lets peft pick
            the classification head (``classifier``/``score``) for sequence classification.
        num_components: N, Gaussian mixture components per column of A. The paper found N = 4
            enough.
        sample_scaler: epsilon, the scale of the noise added to A (``A~ = A + eps * sum_k pi_k
            z_k``). The paper found about 5e-3 best.
        kl_weight: weight of the KL terms in the negative ELBO. 1 is the exact ELBO; smaller
            values temper the prior.
        dirichlet_concentration: alpha0 of the symmetric Dirichlet prior on the mixture weights.
            1 (uniform on the simplex) is the reference implementation's sampler default.
        wishart_df: degrees of freedom of the Wishart prior on the covariance; ``None`` means
            ``lora_r``, as in the paper and its code (scale matrix: identity). Must exceed
            ``lora_r - 1``.
        cooperative_weight: weight of the cooperative loss, the mean over adapted layers of
            ``sum_k pi_k**2`` (minimal, 1/N, when all components share the weight equally). The
            paper adds it to the loss; removing it cost 3-4 accuracy points there.
        variant: ``"paper"``: the paper's draw ``A~ = A + eps * sum_k pi_k z_k`` around a point
            estimate A, with eps fixed. ``"learned"``: every element of ``A~`` has the prior
            ``N(0, prior_std^2)`` and the guide draws column ``j`` of ``A~`` as
            ``A_j + w_j * sum_k pi_k z_k`` with a positive width ``w_j`` per column, learned by the
            ELBO, whose KL to the prior now depends on it (:mod:`pyro_monteclora.models.width`).
            The widths start at ``sample_scaler``.
        prior_std: the prior standard deviation of ``A~``'s elements in the ``"learned"``
            variant (BLoB's 0.2).
        kl_schedule: ``"constant"`` (every step weighs the KL by ``kl_weight``: the ELBO) or
            ``"blob"`` (BLoB's reweighting: step ``i`` of an epoch of ``M`` weighs it by
            ``kl_weight * M * 2**i / (2**(M + 1) - 1)``; :mod:`pyro_monteclora.train.kl_schedule`).
            Used by the Trainer engine (:func:`pyro_monteclora.train`, ``MonteCLoRATrainer``).
        guide_learning_rate: the learning rate of the variational parameters (the Wishart scale,
            the Dirichlet concentrations, the learned widths); ``None``: ``learning_rate``. AdamW
            moves a parameter by about its learning rate per step, so over a short run at 5e-4 a
            log-width moves by a few hundredths at most: a width the ELBO is to learn needs a
            larger rate (BLoB gives its KL step its own optimizer for the same reason). Used by
            :func:`pyro_monteclora.train`.
        column_prior: give every column of ``A~`` the prior ``N(0, s^2 I_r)`` with one scale ``s``
            per layer set by empirical Bayes, so that the ELBO's KL rewards a wider posterior
            (:mod:`pyro_monteclora.models.column_prior`). Off in the paper and by default: its
            KL sums over every column of every adapted layer and outweighs a small training set
            unless ``kl_weight`` is lowered (see ``docs/uncertainty.md``).
        collapse_components: draw the exact-in-distribution equivalent ``||pi||_2 * z`` (one
            Gaussian per column) instead of N components per column: d*r instead of N*d*r
            normal draws per layer. Off by default, as in the paper.
        group_layers: give layers of equal shape one vectorized set of sample sites (a plate over
            layers) instead of three sites per layer. Same distribution, less bookkeeping.
        task: ``"classification"``, ``"causal_lm"``, ``"multiple_choice"`` or ``"auto"`` (from the
            model class). ``"multiple_choice"`` trains a causal LM on rows with ``question``,
            ``choices`` and ``label``: the label is observed from a Categorical over the choices'
            continuation log-likelihoods under the drawn adapter (:mod:`pyro_monteclora.models.choices`).
            ``"auto"`` gives such rows (with a causal LM) this likelihood, the recommendation of
            ``benchmarks/results/arc.md``; ``"causal_lm"`` trains them by SFT on the right answer.
        choice_score: with ``task="multiple_choice"``, the Categorical's logits: ``"sum"`` (each
            choice's summed log-likelihood, lm-eval's ``acc``) or ``"per_char"`` (divided by the
            choice's characters, lm-eval's ``acc_norm``).
        learning_rate: AdamW learning rate for A, B, the head and the variational parameters.
        num_epochs: passes over the training data.
        batch_size: examples per micro-batch on each process (Trainer's
            ``per_device_train_batch_size``); an optimizer step sees ``batch_size *
            gradient_accumulation_steps * processes`` examples.
        gradient_accumulation_steps: micro-batches accumulated per optimizer step.
        gradient_checkpointing: activation checkpointing of the transformer blocks. ``None``
            turns it on for causal LMs and off for classifiers and ``task="multiple_choice"``
            (whose choices run on the prompt's KV cache, which transformers turns off under
            checkpointing; with it on they run one pass per choice). The recomputed forward pass uses
            exactly the adapter drawn for that step.
        mixed_precision: ``None`` (float32), ``"bf16"`` or ``"fp16"`` autocast of the network;
            the variational parameters, the Wishart and Dirichlet draws and the KLs stay float32.
        save_steps: with ``output_dir`` set, write ``output_dir/checkpoint-<step>`` every this
            many optimizer steps (``None``: no intermediate checkpoints).
        save_total_limit: keep at most this many checkpoints (``None``: keep all).
        weight_decay: AdamW weight decay (on all trainable tensors).
        lr_scheduler: ``"linear"`` decay towards 0, ``"cosine"`` or ``"constant"``, each after the
            warm-up (``"constant"`` is transformers' ``constant_with_warmup``). No step runs at
            learning rate 0: warm-up step ``k`` (from 0) uses ``(k + 1) / (warmup + 1)`` of it.
        warmup_ratio: share of the optimizer steps with a linear warm-up of the learning rate.
        max_grad_norm: gradient clipping norm; ``None`` disables clipping.
        max_length: token limit per example (longer ones are truncated).
        seed: seed of everything random in a run (data order, LoRA init, noise, dropout).
        eval_every_epoch: evaluate on the evaluation split (if any) after each epoch.
        log_every: optimizer steps between log records (``TrainResult.history``), progress-bar
            updates and divergence checks (Trainer's ``logging_steps``).
        quantization: load-time quantization of the base: ``None``, ``"int8"`` or ``"int4"``.
        output_dir: where :func:`train` saves its result (``None``: nothing is written).
        merge_adapter: save a merged model (base weights + mean adapter, loadable without this
            package) rather than the adapter alone; the variational posterior is saved either way.
    """

    # --- LoRA (names and defaults as in common fine-tuning tools) -------------------------
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha; scale is alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: Union[str, list[str]] = field(
        default="all-linear", metadata={"help": "'all-linear', module-name suffixes or a regex."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full (default: the task head)."}
    )
    # --- MonteCLoRA ------------------------------------------------------------------------
    num_components: int = field(default=4, metadata={"help": "Mixture components N (paper: 4)."})
    sample_scaler: float = field(default=5e-3, metadata={"help": "Noise scale epsilon (paper: 5e-3)."})
    kl_weight: float = field(default=1.0, metadata={"help": "KL weight; 1 is the exact ELBO."})
    dirichlet_concentration: float = field(
        default=1.0, metadata={"help": "Symmetric Dirichlet prior concentration alpha0."}
    )
    wishart_df: Optional[float] = field(
        default=None, metadata={"help": "Wishart prior degrees of freedom (default: lora_r)."}
    )
    cooperative_weight: float = field(
        default=1.0, metadata={"help": "Weight of the cooperative loss mean(sum_k pi_k^2)."}
    )
    variant: str = field(default="paper", metadata={"help": "paper (fixed width eps) or learned (the ELBO learns a width per column)."})
    prior_std: float = field(default=0.2, metadata={"help": "Prior std of A~'s elements in the learned variant."})
    kl_schedule: str = field(default="constant", metadata={"help": "constant (the ELBO) or blob (BLoB's KL reweighting within each epoch)."})
    column_prior: bool = field(
        default=False, metadata={"help": "Prior N(0, s^2 I) on A~'s columns, s by empirical Bayes (ELBO rewards width)."}
    )
    collapse_components: bool = field(
        default=False, metadata={"help": "Draw ||pi||*z instead of N components (same law)."}
    )
    group_layers: bool = field(
        default=True, metadata={"help": "One vectorized site per group of equally shaped layers."}
    )
    task: str = field(
        default="auto",
        metadata={"help": "classification, causal_lm, multiple_choice or auto (from the model; choice rows: multiple_choice)."}
    )
    choice_score: str = field(
        default="sum", metadata={"help": "multiple_choice: summed log-likelihoods (sum) or per character (per_char)."}
    )
    # --- training --------------------------------------------------------------------------
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    guide_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the variational parameters (None: learning_rate)."}
    )
    num_epochs: int = field(default=3, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=16, metadata={"help": "Examples per micro-batch and process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    gradient_checkpointing: Optional[bool] = field(
        default=None, metadata={"help": "Activation checkpointing (None: on for causal LMs, off for classifiers)."}
    )
    mixed_precision: Optional[str] = field(default=None, metadata={"help": "None, 'bf16' or 'fp16' autocast."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler: str = field(default="linear", metadata={"help": "linear, cosine or constant."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps of warm-up."})
    max_grad_norm: Optional[float] = field(default=1.0, metadata={"help": "Clip norm (None: off)."})
    max_length: int = field(default=256, metadata={"help": "Token limit per example."})
    seed: int = field(default=0, metadata={"help": "Seed of the whole run."})
    eval_every_epoch: bool = field(default=True, metadata={"help": "Evaluate after each epoch."})
    log_every: int = field(default=10, metadata={"help": "Optimizer steps between log records and checks."})
    save_steps: Optional[int] = field(
        default=None, metadata={"help": "Checkpoint every this many steps into output_dir (None: none)."}
    )
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Checkpoints kept (None: all)."})
    quantization: Optional[str] = field(
        default=None, metadata={"help": "None, 'int8' or 'int4' quantization of the base."}
    )
    # --- output ----------------------------------------------------------------------------
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder to save the result in after training (None: don't save)."}
    )
    merge_adapter: bool = field(
        default=True, metadata={"help": "Save a merged model (base + mean adapter); else adapters only."}
    )

    def __post_init__(self) -> None:
        _positive_int(
            self, "lora_r", "num_components", "num_epochs", "batch_size", "max_length", "log_every",
            "gradient_accumulation_steps",
        )
        _positive_int_or_none(self, "save_steps", "save_total_limit")
        for name in ("column_prior", "collapse_components", "group_layers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.gradient_checkpointing not in (None, True, False):
            raise ValueError(f"gradient_checkpointing must be None, True or False, got {self.gradient_checkpointing!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {self.mixed_precision!r}")
        _positive(self, "lora_alpha", "sample_scaler", "dirichlet_concentration", "learning_rate", "prior_std")
        if self.guide_learning_rate is not None and not (_is_number(self.guide_learning_rate) and self.guide_learning_rate > 0):
            raise ValueError(f"guide_learning_rate must be a positive number or None, got {self.guide_learning_rate!r}")
        if self.kl_schedule not in KL_SCHEDULES:
            raise ValueError(f"kl_schedule must be one of {KL_SCHEDULES}, got {self.kl_schedule!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "learned" and self.column_prior:
            raise ValueError("column_prior=True is a prior of the 'paper' variant; the 'learned' variant has its own "
                             "prior N(0, prior_std^2) on A~: use one or the other")
        _non_negative(self, "kl_weight", "cooperative_weight", "weight_decay")
        for name in ("lora_dropout", "warmup_ratio"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.max_grad_norm is not None and not (_is_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}")
        if self.wishart_df is not None and not _is_number(self.wishart_df):
            raise ValueError(f"wishart_df must be a number or None, got {self.wishart_df!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for name in ("eval_every_epoch", "merge_adapter"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, (list, tuple)) and all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save must be None or a list of module names, got {self.modules_to_save!r}")
        if self.output_dir is not None and not (isinstance(self.output_dir, (str, os.PathLike)) and os.fspath(self.output_dir)):
            raise ValueError(f"output_dir must be None or a folder path, got {self.output_dir!r}")
        if self.wishart_df is not None and not self.wishart_df > self.lora_r - 1:
            raise ValueError(
                f"wishart_df must exceed lora_r - 1 = {self.lora_r - 1} for a proper Wishart, "
                f"got {self.wishart_df!r}"
            )
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.choice_score not in CHOICE_SCORES:
            raise ValueError(f"choice_score must be one of {CHOICE_SCORES}, got {self.choice_score!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
                raise ValueError(
                    f"target_modules must be 'all-linear', a regex or a non-empty list of names, "
                    f"got {self.target_modules!r}"
                )
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"target_modules must be a non-empty string or list, got {self.target_modules!r}")

    @property
    def prior_wishart_df(self) -> float:
        """Degrees of freedom of the Wishart prior (``wishart_df``, or ``lora_r`` when unset)."""
        return float(self.lora_r if self.wishart_df is None else self.wishart_df)

    @property
    def lora_scaling(self) -> float:
        """The LoRA scale ``lora_alpha / lora_r`` that multiplies ``B @ A``."""
        return self.lora_alpha / self.lora_r

    def replace(self, **overrides: Any) -> "MonteCLoRAConfig":
        """A copy with some fields changed; unknown names raise ``TypeError`` listing the valid ones."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(
                f"unknown MonteCLoRAConfig field(s) {unknown}; valid fields: {sorted(f.name for f in fields(self))}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as JSON with sorted keys and indentation."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def paper(cls, **overrides: Any) -> "MonteCLoRAConfig":
        """The MonteCLoRA paper's settings, whatever the package's defaults become: N = 4
        components, epsilon = 5e-3, the exact ELBO (KL weight 1), cooperative weight 1, a
        uniform Dirichlet prior and a Wishart prior with ``df = r`` and identity scale, and no
        prior on A's columns.

        Example:
            >>> MonteCLoRAConfig.paper(lora_r=8).sample_scaler
            0.005
        """
        paper = dict(num_components=4, sample_scaler=5e-3, kl_weight=1.0, cooperative_weight=1.0,
                     dirichlet_concentration=1.0, wishart_df=None, collapse_components=False, column_prior=False,
                     variant="paper")
        return cls(**{**paper, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MonteCLoRAConfig":
        """Rebuild a config from :meth:`to_dict`'s output; unknown keys raise ``TypeError``."""
        return cls().replace(**values)


def _positive_int(config: MonteCLoRAConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _positive_int_or_none(config: MonteCLoRAConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _is_number(value: object) -> bool:
    """A finite int or float (not a bool, nan or inf)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive(config: MonteCLoRAConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or not value > 0:
            raise ValueError(f"{name} must be a positive (finite) number, got {value!r}")


def _non_negative(config: MonteCLoRAConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_number(value) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative (finite) number, got {value!r}")
