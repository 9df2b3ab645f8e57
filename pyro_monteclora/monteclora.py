"""``MonteCLoRA``: a transformers model with a MonteCLoRA adapter, its Pyro model and guide.

Example:
    >>> import torch
    >>> from pyro_monteclora import MonteCLoRA
    >>> from pyro_monteclora.testing import tiny_bert
    >>> mc = MonteCLoRA.from_model(tiny_bert(), lora_r=4)
    >>> batch = {"input_ids": torch.tensor([[1, 5, 2]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    >>> mc.mean_logits(batch).shape            # the mean adapter: plain peft LoRA
    torch.Size([1, 2])
    >>> mc.sample_logits(batch).shape          # one adapter drawn from the guide
    torch.Size([1, 2])
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import pyro.poutine as poutine
import torch
from torch import nn

from .config import MonteCLoRAConfig
from .guides import MonteCLoRAGuide
from .io import PathLike, save_merged, save_pretrained
from .io.read import check_model_path, check_num_labels, read_adapter, restore_adapter
from .layers import LayerGroup, attach_lora
from .models import MonteCLoRAModel
from .models.choices import choice_log_likelihoods, choice_logits, is_choice_batch
from .models.model import NON_INPUT_KEYS
from .quantization import load_base_model

__all__ = ["MonteCLoRA", "load", "infer_task", "device_of", "check_decoder"]


def device_of(module: Any) -> torch.device:
    """Device of a module's first parameter (CPU for a module without parameters)."""
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def infer_task(model: nn.Module) -> str:
    """``"classification"`` or ``"causal_lm"`` from a transformers model's class name."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    raise ValueError(
        f"cannot tell the task of a {name}: pass task='classification' (a model returning "
        "(batch, classes) logits) or task='causal_lm' (a model returning (batch, length, vocab) logits)"
    )


#: Encoder-only model types: they have no causal LM to fine-tune (a BERT "LM head" is a masked LM).
ENCODER_MODEL_TYPES = frozenset({
    "albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie", "modernbert",
    "mpnet", "roberta", "xlm-roberta",
})


def check_decoder(model: nn.Module, task: str = "causal_lm") -> None:
    """Refuse an encoder-only model for causal-LM training, with the reason and what to use instead."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ENCODER_MODEL_TYPES and not getattr(config, "is_decoder", False):
        raise ValueError(
            f"task={task!r} needs a decoder (a causal language model such as Llama, GPT-2 or SmolLM2), "
            f"but {type(model).__name__} is a {model_type} encoder; use task='classification' with it"
        )


class MonteCLoRA(nn.Module):
    """A peft LoRA model whose factors A are random, with the matching Pyro model and guide.

    Attributes:
        model: the Pyro model (:class:`~pyro_monteclora.models.MonteCLoRAModel`); holds the network.
        guide: the variational guide (:class:`~pyro_monteclora.guides.MonteCLoRAGuide`).
        groups: the layer groups sharing vectorized sample sites.
        monteclora_config: the :class:`MonteCLoRAConfig` it was built with.
        config: the network's transformers ``PretrainedConfig`` (as ``PeftModel.config``), so
            transformers' ``Trainer`` and TRL see the model they expect.
        task: ``"classification"`` or ``"causal_lm"``.
        tokenizer: the tokenizer used in training, if known.
    """

    #: transformers' flag for "adapters are attached": Trainer then trains a base that is marked
    #: quantized (such as a dequantized GGUF model) through the adapter, as it does a PeftModel.
    _hf_peft_config_loaded = True

    def __init__(
        self,
        network: nn.Module,
        groups: tuple[LayerGroup, ...],
        config: MonteCLoRAConfig,
        task: str,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        self.monteclora_config = config
        self.task = task
        self.groups = groups
        self.tokenizer = tokenizer
        self.model = MonteCLoRAModel(network, groups, config, task)
        self.guide = MonteCLoRAGuide(groups, config)
        if config.variant == "learned":
            self.model.widths = self.guide.widths  # the noise's width is a variational parameter

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        config: Optional[MonteCLoRAConfig] = None,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> "MonteCLoRA":
        """Attach a MonteCLoRA adapter to a transformers model (modified in place by peft)."""
        config = (config or MonteCLoRAConfig()).replace(**overrides)
        task = infer_task(model) if config.task == "auto" else config.task
        if task in ("causal_lm", "multiple_choice"):  # multiple choice: a causal LM scoring each choice
            check_decoder(model, task)
            task = "causal_lm"
        if config.quantization:
            from .quantization import quantization_of, quantize_base

            if quantization_of(model) is None:
                model = quantize_base(model, config.quantization, exclude=config.modules_to_save)
        network, groups = attach_lora(model, config, task)
        device = device_of(network)
        return cls(network, groups, config, task, tokenizer).to(device)

    @property
    def network(self) -> nn.Module:
        """The peft model (base + mean LoRA adapter)."""
        return self.model.network

    def __getattr__(self, name: str) -> Any:
        """Attributes of the network (``generation_config``, ``generate``, ``add_model_tags``, ...),
        as ``PeftModel`` forwards to its base model, so Trainer and TRL see a transformers model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model.network, name)

    @property
    def config(self) -> Any:
        """The network's transformers config (the MonteCLoRA one is :attr:`monteclora_config`)."""
        return self.network.config

    @property
    def main_input_name(self) -> str:
        return getattr(self.network, "main_input_name", "input_ids")

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: Optional[dict] = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Checkpoint the transformer blocks (transformers' switch, called by ``Trainer``).

        Training through :class:`~pyro_monteclora.MonteCLoRATrainer` keeps each step's draw in
        place until its backward pass has run, so the recompute uses the drawn adapter.
        """
        base = self.network.get_base_model()
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload
        )
        base.enable_input_require_grads()  # frozen embeddings: reentrant checkpoints still need a grad path

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (the name before transformers 5.23)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        base = self.network.get_base_model()
        disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        base = self.network.get_base_model()
        return bool(getattr(base, "is_activation_checkpointing", False))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """A, B, the task head and the variational parameters (what training updates)."""
        network = [p for p in self.network.parameters() if p.requires_grad]
        return network + list(self.guide.parameters())

    def num_extra_parameters(self) -> int:
        """Parameters MonteCLoRA adds to plain LoRA: ``r + N`` per adapted layer (``+ d``: the learned variant's widths)."""
        return sum(p.numel() for p in self.guide.parameters())

    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The network's inputs of ``batch``, tensors on the network's device (a CPU batch runs on a GPU
        model); other arguments (``use_cache=True``, ...) pass through."""
        device = device_of(self.network)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k not in NON_INPUT_KEYS}

    def mean_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the mean adapter (``A~ = E[A~] = A``): exactly the peft LoRA model.

        For a multiple-choice batch, the ``(rows, K)`` logits over the choices (:mod:`.models.choices`).
        """
        if is_choice_batch(batch):
            return choice_logits(choice_log_likelihoods(self.network, batch)[0][0], batch, self.model.choice_score)
        return self.network(**self._inputs(batch)).logits

    def sample_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits with one adapter drawn from the guide (the variational posterior)."""
        guide_trace = poutine.trace(self.guide).get_trace(batch)
        inputs = self._inputs(batch)
        return poutine.block(poutine.replay(self.model, trace=guide_trace))(inputs)

    def save_pretrained(self, folder: str, *, merged: bool = False, overwrite: bool = False) -> str:
        """Write the mean adapter (stock peft files), the variational posterior and the config.

        With ``merged=True`` the folder holds a plain transformers model (base + mean adapter)
        with the full adapter folder beside it. See :mod:`pyro_monteclora.io`.
        """
        return (save_merged if merged else save_pretrained)(self, folder, overwrite=overwrite)

    def forward(self, objective: Optional[Callable[[Mapping[str, torch.Tensor]], Any]] = None, **inputs: Any) -> Any:
        """The network's forward pass with the mean adapter (transformers outputs).

        With ``objective`` (a callable such as a bound
        :class:`~pyro_monteclora.train.ELBOLoss`), returns ``objective(inputs)`` instead: the
        training objective computed inside ``forward``, so DDP sees every parameter it uses.
        """
        if objective is not None:
            return objective(inputs)
        return self.network(**self._inputs(inputs))


def load(
    base_model: Union[nn.Module, PathLike],
    folder: PathLike,
    *,
    tokenizer: Any = None,
    device: Optional[Union[str, torch.device]] = None,
) -> MonteCLoRA:
    """Restore the full Bayesian adapter saved in ``folder`` on ``base_model``.

    The one place that builds a :class:`MonteCLoRA` from files: :func:`pyro_monteclora.io.read_adapter`
    reads and checks them (JSON and safetensors only, never a pickle), this builds the adapter.

    Args:
        base_model: the base transformers model (modified in place by peft; used as given,
            quantized or not), or its path or hub id (loaded from safetensors and quantized as in
            training).
        folder: an adapter folder or a merged output (its ``adapter/`` subfolder is used).
        tokenizer: the tokenizer; by default the one saved in the folder, if any.
        device: where to put the model (default: where the base model is).

    The adapter weights, the task head and the variational parameters are restored exactly, so
    the posterior predictive with the same seed gives the same outputs as before saving.

    Example:
        >>> import tempfile
        >>> from pyro_monteclora.testing import tiny_bert
        >>> folder = MonteCLoRA.from_model(tiny_bert(), lora_r=4).save_pretrained(tempfile.mkdtemp() + "/adapter")
        >>> load(tiny_bert(), folder).task
        'classification'
    """
    saved = read_adapter(folder)
    config, meta = saved.config, saved.meta
    if not isinstance(base_model, nn.Module):
        check_model_path(base_model)
        base_model = load_base_model(
            base_model,
            meta["task"],
            config.quantization,
            num_labels=meta.get("num_labels"),
            id2label=meta.get("id2label"),
            device=None if device is None else str(device),
            exclude=config.modules_to_save,
        )
    check_num_labels(meta, base_model, saved.folder)
    with torch.random.fork_rng():  # LoRA's random init must not move the caller's RNG
        # A base model object is used as given (quantized or not): quantization=None here.
        monteclora = MonteCLoRA.from_model(base_model, config.replace(quantization=None), tokenizer=tokenizer)
    restore_adapter(monteclora, saved)
    if device is not None:
        monteclora.to(device)
    return monteclora.eval()
