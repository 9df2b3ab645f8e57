"""The MonteCLoRA variational guide."""

from .guide import GroupPosterior, MonteCLoRAGuide

__all__ = ["MonteCLoRAGuide", "GroupPosterior"]
