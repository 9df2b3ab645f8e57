"""Tiny randomly initialized transformers models for tests, examples and docstrings.

Example:
    >>> model = tiny_bert(num_labels=3)
    >>> model.config.num_labels
    3
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Optional

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

__all__ = [
    "tiny_bert", "tiny_llama", "toy_sentiment", "toy_tokenizer", "tiny_bpe_tokenizer", "nonzero_lora_b", "CharTokenizer",
    "TOY_WORDS",
]

TOY_WORDS = ["good", "great", "nice", "happy", "bad", "awful", "sad", "ugly", "the", "is", "positive", "negative"]


def tiny_bert(vocab_size: int = 64, num_labels: int = 2, hidden_size: int = 16, seed: int = 0) -> BertForSequenceClassification:
    """A 1-layer BERT classifier (hidden 16, intermediate 32, no dropout) with a seeded random init."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
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


def toy_sentiment(n: int = 64) -> list[dict]:
    """Two-word texts whose label is whether the adjective is positive."""
    positive, negative = TOY_WORDS[:4], TOY_WORDS[4:8]
    rows = []
    for i in range(n):
        label = i % 2
        word = (positive if label else negative)[(i // 2) % 4]
        rows.append({"text": f"the {word}" if i % 3 else f"{word} is", "label": label})
    return rows


def toy_tokenizer(words: Sequence[str] = TOY_WORDS, folder: Optional[str] = None) -> BertTokenizerFast:
    """A BERT WordPiece tokenizer over ``[PAD] [UNK] [CLS] [SEP]`` + ``words``, ids in that order
    (no hub access). Its ``vocab.txt`` is written to ``folder`` (default: a new temporary folder).

    Example:
        >>> toy_tokenizer(["good", "bad"])("good bad")["input_ids"]
        [2, 4, 5, 3]
    """
    folder = folder if folder is not None else tempfile.mkdtemp(prefix="toy_tokenizer_")
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w", encoding="utf-8") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]) + "\n")
    return BertTokenizerFast(vocab)


#: What :func:`tiny_bpe_tokenizer` learns its merges from.
BPE_CORPUS = (
    "Question: Is the sky blue? Answer: yes no. Question: Which is a colour? Answer: red dog run. "
    "Pick the number: cat seven tree blue. Which animal barks? a cat a dog a fish a bird a cow. "
    "Two plus two is four five. Opposite of hot? warm cold very hot. Which is a fruit? apple car stone lamp. "
    "Water freezes at zero degrees ten degrees. What do bees make? milk honey silk. The quick brown fox."
)


def tiny_bpe_tokenizer(vocab_size: int = 320, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (a ``PreTrainedTokenizerFast``, Llama-3 style: a space attaches to
    the next word) trained in-process on :data:`BPE_CORPUS`: pad 0, bos 1, eos 2 (as :func:`tiny_llama`),
    BOS added by default as a Llama tokenizer does. Any text encodes (bytes are the fallback); a
    real tokenizer for lm-eval's ``HFLM``, which :class:`CharTokenizer` is not.

    Example:
        >>> tokenizer = tiny_bpe_tokenizer()
        >>> ids = tokenizer("Question: Is ice cold?")["input_ids"]
        >>> ids[0] == tokenizer.bos_token_id, tokenizer.decode(ids[1:])
        (True, 'Question: Is ice cold?')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([BPE_CORPUS] * 3, trainer=trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   name_or_path="tiny-bpe")


class CharTokenizer:
    """A character-level stand-in for a causal LM's tokenizer (ids 3..62, bos 1, eos 2, pad 0),
    for :func:`tiny_llama` (vocabulary 64).

    Example:
        >>> CharTokenizer()(["ab"])["input_ids"]
        [[1, 40, 41]]
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = True, **_: object) -> dict[str, list[list[int]]]:
        bos = [self.bos_token_id] if add_special_tokens else []
        return {"input_ids": [bos + [3 + ord(c) % 60 for c in t] for t in texts]}


def nonzero_lora_b(network: torch.nn.Module, std: float = 0.5, seed: int = 1) -> None:
    """LoRA B starts at zero, which hides any noise in A: give it random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
