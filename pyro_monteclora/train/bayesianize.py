"""``bayesianize``: give a LoRA adapter that is already trained a MonteCLoRA posterior.

The trained factors A and B (and a trained head) stay exactly as they are: they become the
posterior mean (``E[A~] = A``), so the mean adapter is the given LoRA model. Only the
variational parameters (the Wishart scales and Dirichlet concentrations, ``r + N`` numbers per
layer) are fitted, by the same ELBO, on a small (validation) set: minutes instead of a
fine-tune, and a posterior predictive for any peft LoRA.

Example:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from pyro_monteclora import bayesianize
    >>> from pyro_monteclora.testing import tiny_bert, toy_sentiment, toy_tokenizer
    >>> lora = get_peft_model(tiny_bert(vocab_size=8), LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    >>> result = bayesianize(lora, toy_sentiment(16), tokenizer=toy_tokenizer(["the", "is", "good", "bad"]),
    ...                      num_epochs=1, batch_size=8, progress=False)
    >>> sorted({n.split(".")[1] for n, p in result.model.named_parameters() if p.requires_grad})
    ['posteriors']
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from ..config import MonteCLoRAConfig
from ..layers import ADAPTER_NAME
from ..monteclora import MonteCLoRA
from .api import train

__all__ = ["bayesianize", "from_peft_lora"]


def from_peft_lora(peft_model: Any, config: Optional[MonteCLoRAConfig] = None, **overrides: Any) -> MonteCLoRA:
    """A :class:`MonteCLoRA` whose mean adapter is ``peft_model``'s LoRA adapter (copied exactly).

    The LoRA rank, alpha, dropout, target and saved modules come from the adapter's config;
    ``config``/``overrides`` set the MonteCLoRA knobs. ``peft_model`` is unloaded in place (its
    base model is reused).
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"bayesianize needs a peft.PeftModel with a LoRA adapter, got {type(peft_model).__name__}")
    name = peft_model.active_adapter if isinstance(peft_model.active_adapter, str) else peft_model.active_adapters[0]
    lora = peft_model.peft_config[name]
    if getattr(lora, "peft_type", None) is None or str(lora.peft_type.value) != "LORA":
        raise ValueError(f"bayesianize needs a LoRA adapter, got a {getattr(lora, 'peft_type', type(lora).__name__)} one")
    if getattr(lora, "use_dora", False):
        raise ValueError("bayesianize does not support DoRA adapters (its magnitude vector is not a LoRA factor)")
    if lora.rank_pattern or lora.alpha_pattern:
        raise ValueError("bayesianize needs one rank and one alpha for all layers (rank_pattern/alpha_pattern are set)")
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()}
    targets = lora.target_modules
    values = dict(
        lora_r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        modules_to_save=_saved_modules(peft_model),
    )
    config = (config or MonteCLoRAConfig()).replace(**values).replace(**overrides)
    base = peft_model.unload()
    with torch.random.fork_rng():  # LoRA's init is overwritten below; keep the caller's random state
        monteclora = MonteCLoRA.from_model(base, config)
    outcome = set_peft_model_state_dict(monteclora.network, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(outcome, "unexpected_keys", []))
    if unexpected:
        raise ValueError(f"the LoRA adapter does not fit the rebuilt model: {len(unexpected)} tensor(s), first {unexpected[0]!r}")
    return monteclora


def _saved_modules(peft_model: Any) -> Optional[list[str]]:
    """The modules the adapter really trains in full (peft's ``modules_to_save`` for a task lists
    candidates, such as ``classifier`` and ``score``, of which a model has one)."""
    from peft.utils import ModulesToSaveWrapper

    names = sorted({n.split(".")[-1] for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)})
    return names or None


def bayesianize(
    peft_model: Any,
    validation_data: Any,
    config: Optional[MonteCLoRAConfig] = None,
    *,
    tokenizer: Any = None,
    progress: bool = True,
    **overrides: Any,
) -> Any:
    """Fit a MonteCLoRA posterior around a trained peft LoRA adapter, which stays frozen.

    Args:
        peft_model: a ``peft.PeftModel`` with a trained LoRA adapter (classification or causal LM).
        validation_data: data in any form :func:`pyro_monteclora.train` accepts; only the
            ``r + N`` variational parameters per layer are fitted on it.
        config: MonteCLoRA and training knobs (``learning_rate``, ``num_epochs``,
            ``sample_scaler``, ...); the LoRA shape comes from the adapter.
        tokenizer: the tokenizer (default: from the model's folder).
        progress: show the progress bar.

    Returns the :class:`~pyro_monteclora.TrainResult` of the fit; ``result.model`` is the
    Bayesian adapter, whose mean adapter equals the given LoRA model.
    """
    monteclora = from_peft_lora(peft_model, config, **overrides)
    for parameter in monteclora.network.parameters():
        parameter.requires_grad_(False)  # A, B and the head are the posterior mean: frozen
    return train(monteclora, validation_data, tokenizer=tokenizer, progress=progress)
