"""Put a LoRA adapter on a transformers model through peft and make its factor A stochastic.

peft builds a standard LoRA adapter (``LoraConfig`` + ``get_peft_model``, ``"all-linear"``
resolved by peft). Each ``lora_A`` linear keeps its weight, its state-dict key and its class
ancestry (``nn.Linear``) but learns to read the noise of its *group* — layers of equal
``(in_features, r)`` share one vectorized set of latent variables — from a :class:`NoiseSlot`
while a noise context is open. Outside a context, the slot is empty and the layer is exactly
peft's mean LoRA: ``E[A~] = A``, merging and saving work unchanged.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from pyro_monteclora import MonteCLoRAConfig
    >>> from pyro_monteclora.layers import attach_lora
    >>> tiny = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16,
    ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2))
    >>> network, groups = attach_lora(tiny, MonteCLoRAConfig(lora_r=4), task="classification")
    >>> [(g.name, g.in_features, g.num_layers) for g in groups]
    [('d16', 16, 6), ('d32', 32, 1)]
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import MonteCLoRAConfig

ADAPTER_NAME = "default"

__all__ = ["NoiseSlot", "StochasticLoraA", "LayerGroup", "attach_lora", "noise_context", "ADAPTER_NAME"]


class NoiseSlot:
    """Where the layers of one group read their current noise.

    ``value`` is ``None`` (mean adapter), a tensor ``(layers, r, d)`` (one draw for the whole
    batch) or ``(S, layers, r, d)`` (S draws; the batch is then S equal-sized blocks, sample-major).
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Optional[torch.Tensor] = None


class StochasticLoraA(nn.Linear):
    """peft's ``lora_A`` linear, computing with ``A + noise`` while its group's slot is filled."""

    noise_slot: NoiseSlot
    noise_index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.noise_slot.value
        if noise is None:
            return F.linear(x, self.weight, self.bias)
        if noise.dim() == 3:
            return F.linear(x, self.weight + noise[self.noise_index].to(self.weight.dtype), self.bias)
        weight = self.weight + noise[:, self.noise_index].to(self.weight.dtype)  # (S, r, d)
        samples = weight.shape[0]
        if x.shape[0] % samples:
            raise ValueError(
                f"a batch of {x.shape[0]} rows cannot be split into {samples} posterior draws; "
                "repeat the batch once per draw (sample-major) before the forward pass"
            )
        blocks = x.reshape(samples, -1, x.shape[-1])
        out = torch.bmm(blocks, weight.transpose(1, 2))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], weight.shape[1])


@dataclass
class LayerGroup:
    """Adapted layers of equal shape that share one vectorized set of latent sites.

    Attributes:
        name: short identifier used in site names (``"d384"``: in_features 384).
        in_features: d, the width of the layers' input (columns of A).
        rank: r, the LoRA rank (rows of A).
        module_names: peft module paths of the layers, in group order.
        slot: where the layers read their noise.
    """

    name: str
    in_features: int
    rank: int
    module_names: tuple[str, ...]
    slot: NoiseSlot = field(default_factory=NoiseSlot, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.module_names)


@contextlib.contextmanager
def noise_context(groups: tuple[LayerGroup, ...], noise: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Fill the groups' slots with ``noise[group.name]`` for the duration of the block."""
    previous = [g.slot.value for g in groups]
    try:
        for g in groups:
            g.slot.value = noise[g.name]
        yield
    finally:
        for g, value in zip(groups, previous):
            g.slot.value = value


def _task_type(task: str) -> TaskType:
    return TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear``-like modules of a model (the candidates for ``target_modules``)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit"):
            names.append(name)
    return names


def _suffixes(names: list[str]) -> list[str]:
    return sorted({n.split(".")[-1] for n in names if n})


def attach_lora(
    model: nn.Module, config: MonteCLoRAConfig, task: str
) -> tuple[PeftModel, tuple[LayerGroup, ...]]:
    """Inject peft LoRA into ``model`` (in place) and make every ``lora_A`` stochastic.

    Returns the ``PeftModel`` and the layer groups. Raises ``ValueError`` (and leaves ``model``
    without adapters) for unknown target modules, a model with nothing to adapt, or a rank
    larger than a layer's width.
    """
    if isinstance(model, PeftModel):
        raise ValueError(
            "the model already carries a peft adapter; pass the base transformers model "
            "(or a MonteCLoRA model to continue training)"
        )
    linear = linear_module_names(model)
    if not linear:
        raise ValueError(
            f"{type(model).__name__} has no linear layers to adapt: MonteCLoRA adapts nn.Linear "
            "(or transformers Conv1D) layers"
        )
    _check_modules_to_save(model, config.modules_to_save)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
        task_type=_task_type(task),
        bias="none",
    )
    try:
        with warnings.catch_warnings():  # peft reads transformers' deprecated name; nothing for our user to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            network = get_peft_model(model, lora_config)
    except ValueError as error:
        message = str(error)
        if "not found" in message or "No modules were targeted" in message or "target" in message.lower():
            raise ValueError(
                f"target_modules={config.target_modules!r} matches no adaptable layer of "
                f"{type(model).__name__}: {message.split('. ')[0].rstrip('.')}. Linear layer names in this model: "
                f"{_suffixes(linear)}; use 'all-linear' or some of these names."
            ) from error
        raise
    layers = [(name, m) for name, m in network.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        network.unload()
        raise ValueError(
            f"target_modules={config.target_modules!r} selected no layer of {type(model).__name__} "
            f"(its linear layers: {_suffixes(linear)})"
        )
    for name, layer in layers:
        width = min(layer.in_features, layer.out_features)
        if config.lora_r > width:
            network.unload()
            raise ValueError(
                f"lora_r={config.lora_r} is larger than the width {width} of layer {name!r} "
                f"(in_features={layer.in_features}, out_features={layer.out_features}); use lora_r <= {width} "
                "or leave this layer out of target_modules"
            )
    return network, _make_groups(layers, config)


def _check_modules_to_save(model: nn.Module, names: Optional[list[str]]) -> None:
    """Every ``modules_to_save`` entry must name a module (peft matches it as a name suffix)."""
    known = [n for n, _ in model.named_modules() if n]
    unknown = [m for m in names or [] if not any(n == m or n.endswith("." + m) for n in known)]
    if unknown:
        top = sorted({n.split(".")[0] for n in known})
        raise ValueError(
            f"modules_to_save={unknown} matches no module of {type(model).__name__}; its top-level modules are "
            f"{top} (a name may also be the last part of a module path, such as 'classifier')"
        )


def _make_groups(layers: list[tuple[str, LoraLayer]], config: MonteCLoRAConfig) -> tuple[LayerGroup, ...]:
    by_key: dict[tuple, list[tuple[str, nn.Linear]]] = {}
    for position, (name, layer) in enumerate(layers):
        lora_a = layer.lora_A[ADAPTER_NAME]
        key = (lora_a.in_features, lora_a.out_features) if config.group_layers else (position,)
        by_key.setdefault(key, []).append((name, lora_a))
    groups = []
    for key, members in by_key.items():
        in_features = members[0][1].in_features
        name = f"d{in_features}" if config.group_layers else f"layer{key[0]:03d}"
        group = LayerGroup(
            name=name,
            in_features=in_features,
            rank=members[0][1].out_features,
            module_names=tuple(_clean(n) for n, _ in members),
        )
        for index, (_, lora_a) in enumerate(members):
            lora_a.__class__ = StochasticLoraA
            lora_a.noise_slot = group.slot
            lora_a.noise_index = index
        groups.append(group)
    return tuple(groups)


def _clean(name: str) -> str:
    return re.sub(r"^base_model\.model\.", "", name)
