"""The ``README.md`` model card written beside a saved MonteCLoRA adapter or merged model.

Example:
    >>> from pyro_monteclora import MonteCLoRAConfig
    >>> card = model_card(MonteCLoRAConfig(lora_r=8), base_model="org/base", task="classification",
    ...                   merged=False, metrics={"accuracy": 0.9})
    >>> card.splitlines()[:4]
    ['---', 'base_model: org/base', 'library_name: peft', 'tags:']
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from ..config import MonteCLoRAConfig

__all__ = ["model_card"]

LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")
MONTECLORA_FIELDS = (
    "variant",
    "prior_std",
    "num_components",
    "sample_scaler",
    "kl_weight",
    "dirichlet_concentration",
    "wishart_df",
    "cooperative_weight",
    "column_prior",
    "collapse_components",
    "group_layers",
)
TRAINING_FIELDS = (
    "learning_rate",
    "num_epochs",
    "batch_size",
    "weight_decay",
    "lr_scheduler",
    "warmup_ratio",
    "max_grad_norm",
    "max_length",
    "seed",
    "quantization",
)


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) and (":" in value or value.strip() != value) else str(value)


def _table(config: MonteCLoRAConfig, names: tuple[str, ...]) -> list[str]:
    lines = ["| setting | value |", "|---|---|"]
    for name in names:
        lines.append(f"| `{name}` | `{json.dumps(getattr(config, name))}` |")
    return lines


def model_card(
    config: MonteCLoRAConfig,
    *,
    base_model: Optional[str],
    task: str,
    merged: bool,
    metrics: Optional[Mapping[str, float]] = None,
    version: str = "",
) -> str:
    """Markdown with YAML front matter (``base_model``, ``library_name: peft``, tags) and the settings."""
    front = ["---"]
    if base_model:
        front.append(f"base_model: {_yaml_scalar(base_model)}")
    front += ["library_name: peft", "tags:", "- lora", "- monteclora", "- bayesian", "- pyro"]
    front.append(f"pipeline_tag: {'text-classification' if task == 'classification' else 'text-generation'}")
    front.append("---")
    what = (
        "a merged model (base weights + the mean of the MonteCLoRA adapter): load it with plain "
        "`transformers`; the Bayesian adapter is in `adapter/`"
        if merged
        else "a LoRA adapter (the mean of the MonteCLoRA posterior) that `peft.PeftModel.from_pretrained` "
        "loads as is, plus the variational posterior"
    )
    body = [
        "",
        f"# MonteCLoRA fine-tune{f' of {base_model}' if base_model else ''}",
        "",
        f"This folder holds {what}. Task: `{task}`.",
        "",
        "Restore the full Bayesian adapter (posterior predictive, uncertainty) with",
        "",
        "```python",
        "import pyro_monteclora",
        f"monteclora = pyro_monteclora.load({json.dumps(base_model or 'BASE_MODEL')}, \"THIS_FOLDER\")",
        "```",
        "",
        "## LoRA settings",
        "",
        *_table(config, LORA_FIELDS),
        "",
        "## MonteCLoRA settings",
        "",
        *_table(config, MONTECLORA_FIELDS),
        "",
        "## Training settings",
        "",
        *_table(config, TRAINING_FIELDS),
        "",
        "## Final metrics",
        "",
    ]
    if metrics:
        body += ["| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    else:
        body.append("No metrics were recorded.")
    body += ["", f"Written by pyro-monteclora {version}.".replace(" .", "."), ""]
    return "\n".join(front + body)
