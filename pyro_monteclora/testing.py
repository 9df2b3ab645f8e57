"""Tiny randomly initialized transformers models for tests, examples and docstrings.

Example:
    >>> model = tiny_bert(num_labels=3)
    >>> model.config.num_labels
    3
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

__all__ = ["tiny_bert", "tiny_llama"]


def tiny_bert(vocab_size: int = 64, num_labels: int = 2, hidden_size: int = 16, seed: int = 0) -> BertForSequenceClassification:
    """A 1-layer BERT classifier (hidden 16, intermediate 32) with a seeded random init."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BertForSequenceClassification(config)


def tiny_llama(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A small Llama causal LM (hidden 32, 2 layers by default) with a seeded random init."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
