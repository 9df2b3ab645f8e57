"""The merge tool: merged outputs equal the mean adapter's, embeddings padded, clear errors."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pyro_monteclora import MonteCLoRA
from pyro_monteclora.io import save_pretrained
from pyro_monteclora.export.merge import merge
from pyro_monteclora.testing import TOY_WORDS, nonzero_lora_b, tiny_bert, tiny_llama, toy_tokenizer

BATCH = {"input_ids": torch.tensor([[2, 5, 7, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}


def _base_and_adapter(tmp_path, make, tokenizer=None, **overrides):
    base = tmp_path / "base"
    make().save_pretrained(base)
    if tokenizer is not None:
        tokenizer.save_pretrained(base)
    mc = MonteCLoRA.from_model(make(), lora_r=4, lora_alpha=8, tokenizer=tokenizer, **overrides)
    nonzero_lora_b(mc.network)
    with torch.no_grad():
        for name, param in mc.network.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.5)
    adapter = save_pretrained(mc.eval(), tmp_path / "adapter")
    return str(base), adapter, mc


@pytest.mark.parametrize(
    "make, auto", [(tiny_bert, AutoModelForSequenceClassification), (tiny_llama, AutoModelForCausalLM)], ids=["bert", "llama"]
)
def test_merged_equals_unmerged_mean(make, auto, tmp_path):
    base, adapter, mc = _base_and_adapter(tmp_path, make)
    out = merge(base, adapter, output_folder=str(tmp_path / "merged"))
    merged = auto.from_pretrained(out).eval()
    expected = mc.mean_logits(BATCH)
    torch.testing.assert_close(merged(**BATCH).logits, expected, atol=1e-5, rtol=0)
    plain = auto.from_pretrained(base).eval()
    assert (plain(**BATCH).logits - expected).abs().max() > 1e-3  # the adapter changes the outputs


def test_exactly_one_target(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        merge("base", "adapter")
    with pytest.raises(ValueError, match="exactly one"):
        merge("base", "adapter", output_folder=str(tmp_path), push_to_hub="me/repo")


def test_pad_to_multiple_of_resizes_embeddings(tmp_path):
    tokenizer = toy_tokenizer(TOY_WORDS + [f"w{i}" for i in range(60)], str(tmp_path))  # 76 > 64 tokens
    base, adapter, _ = _base_and_adapter(tmp_path, tiny_bert, tokenizer)
    out = merge(base, adapter, output_folder=str(tmp_path / "merged"), pad_to_multiple_of=32)
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.get_input_embeddings().weight.shape[0] == 96
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))


def test_warns_when_merging_into_a_quantized_base(tmp_path):
    base, adapter, _ = _base_and_adapter(tmp_path, tiny_bert, quantization="int8")
    with pytest.warns(UserWarning, match="quantized base"):
        merge(base, adapter, output_folder=str(tmp_path / "merged"))
