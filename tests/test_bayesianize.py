"""bayesianize: a trained peft LoRA keeps its factors (the posterior mean); only the posterior is fitted."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import pyro_monteclora
from pyro_monteclora import bayesianize
from pyro_monteclora.testing import nonzero_lora_b, tiny_bert, tiny_llama, toy_sentiment

BATCH = {"input_ids": torch.tensor([[2, 6, 3, 5], [2, 7, 4, 3]]), "attention_mask": torch.ones(2, 4, dtype=torch.long)}


def _trained_lora(model, task):
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type=task))
    nonzero_lora_b(lora)  # stands for a LoRA trained elsewhere
    return lora.eval()


@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_bayesianize_keeps_the_lora_and_fits_only_the_posterior(word_tokenizer, kind):
    if kind == "classification":
        lora, data = _trained_lora(tiny_bert(vocab_size=16), "SEQ_CLS"), toy_sentiment(16)
        with torch.no_grad():
            head = next(p for n, p in lora.named_parameters() if "modules_to_save" in n and "weight" in n)
            head.normal_()  # a trained head
    else:
        lora = _trained_lora(tiny_llama(vocab_size=16), "CAUSAL_LM")
        data = [{"prompt": "the good is", "completion": "bad"}] * 8
    with torch.no_grad():
        want = lora(**BATCH).logits
    lora_tensors = {k: v.clone() for k, v in lora.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    result = bayesianize(lora, data, tokenizer=word_tokenizer, num_epochs=2, batch_size=4, learning_rate=5e-2,
                         sample_scaler=0.3, progress=False)
    mc = result.model
    with torch.no_grad():
        assert torch.allclose(mc.mean_logits(BATCH), want, atol=1e-6)  # E[A~] = A: the mean adapter is the LoRA
    saved = {k.replace("base_model.model.", "", 1): v for k, v in lora_tensors.items()}
    current = {k.replace("base_model.model.", "", 1): v for k, v in mc.network.state_dict().items()}
    for key, value in saved.items():
        assert torch.equal(current[key], value), key  # frozen exactly
    trainable = {n for n, p in mc.named_parameters() if p.requires_grad}
    assert trainable and all(".posteriors." in n for n in trainable)
    moved = [not torch.equal(p, torch.zeros_like(p)) for n, p in mc.guide.named_parameters() if "log_scale" in n]
    assert any(moved)  # the posterior left its initial (prior) value
    out = pyro_monteclora.Predictive(mc, num_samples=4, seed=0)(BATCH)
    assert torch.isfinite(out["mutual_information"]).all() and float(out["mutual_information"].max()) > 0


def test_bayesianize_refuses_what_is_not_a_lora(word_tokenizer):
    with pytest.raises(TypeError, match="peft.PeftModel"):
        bayesianize(tiny_bert(vocab_size=16), toy_sentiment(8), tokenizer=word_tokenizer)
    dora = get_peft_model(tiny_bert(vocab_size=16), LoraConfig(r=4, target_modules="all-linear", use_dora=True,
                                                               task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="DoRA"):
        bayesianize(dora, toy_sentiment(8), tokenizer=word_tokenizer)
