"""Leaving the package: a merged transformers model (:mod:`.merge`) and Kohya LoRA files (:mod:`.kohya`).

Example:
    >>> from pyro_monteclora.export import kohya_key
    >>> kohya_key("model.layers.0.self_attn.q_proj")
    'lora_model_layers_0_self_attn_q_proj'
"""

from .kohya import from_kohya_state_dict, kohya_key, kohya_to_peft, peft_to_kohya, to_kohya_state_dict
from .merge import merge, push_folder

__all__ = ["merge", "push_folder", "peft_to_kohya", "kohya_to_peft", "kohya_key", "to_kohya_state_dict",
           "from_kohya_state_dict"]
