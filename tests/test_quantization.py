"""Quantized bases on the CPU (optimum-quanto): MonteCLoRA trains on top, saves and reloads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("optimum.quanto")

from pyro_monteclora import MonteCLoRA  # noqa: E402
from pyro_monteclora.io import load, save_merged, save_pretrained  # noqa: E402
from pyro_monteclora.quantization import load_base_model, quantization_of, quantize_base  # noqa: E402
from pyro_monteclora.testing import tiny_bert, toy_sentiment  # noqa: E402
from pyro_monteclora.train import train  # noqa: E402

BATCH = {"input_ids": torch.tensor([[2, 5, 7, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantize_base_replaces_linears_but_not_the_head(kind):
    model = quantize_base(tiny_bert(), kind)
    assert quantization_of(model) == kind
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query).__name__ == "QLinear" and isinstance(query, nn.Linear)
    assert type(model.classifier) is nn.Linear
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n and not n.startswith("classifier"))


def test_lora_trains_on_a_quantized_base_and_the_loss_falls(word_tokenizer):
    base = quantize_base(tiny_bert(vocab_size=len(word_tokenizer), hidden_size=32), "int8")
    frozen = base.bert.encoder.layer[0].attention.self.query.weight.dequantize().clone()
    result = train(base, toy_sentiment(64), tokenizer=word_tokenizer, eval_dataset=toy_sentiment(32), lora_r=4,
                   num_epochs=6, batch_size=8, learning_rate=3e-3, progress=False)
    nll = [e["nll"] for e in result.evaluations]  # mean adapter on held-out rows, after each epoch
    assert nll[-1] < nll[0] - 0.01 and nll[-1] < 0.68  # chance: log 2 = 0.693
    assert result.evaluations[-1]["accuracy"] > 0.6
    layer = result.model.network.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    assert type(layer.base_layer).__name__ == "QLinear"  # LoRA sits on the quantized linear
    assert type(layer.lora_A["default"]).__name__ == "StochasticLoraA"
    assert layer.lora_B["default"].weight.abs().sum() > 0
    assert torch.equal(layer.base_layer.weight.dequantize(), frozen)  # the quantized base did not move


def test_quantized_round_trip_and_merge_warning(tmp_path):
    base_folder = tmp_path / "base"
    tiny_bert().save_pretrained(base_folder)
    base = load_base_model(str(base_folder), quantization="int8", device="cpu")
    assert quantization_of(base) == "int8"
    mc = MonteCLoRA.from_model(base, lora_r=4, quantization="int8")
    with torch.no_grad():
        for name, param in mc.network.named_parameters():
            if "lora_B" in name:
                param.normal_()
    mc.eval()
    folder = save_pretrained(mc, tmp_path / "adapter")
    again = load(str(base_folder), folder)  # a path: reloaded and quantized as in training
    assert quantization_of(again.network) == "int8"
    assert torch.equal(again.mean_logits(BATCH), mc.mean_logits(BATCH))
    with pytest.warns(UserWarning, match="quantized base"):
        merged = save_merged(mc, tmp_path / "merged")
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    torch.testing.assert_close(plain(**BATCH).logits, mc.mean_logits(BATCH), atol=1e-4, rtol=0)


def test_cuda_quantization_needs_bitsandbytes(tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        tiny_bert().save_pretrained(tmp_path)
        with pytest.raises(ImportError, match="bitsandbytes"):
            load_base_model(str(tmp_path), "classification", "int4", device="cuda")
    else:  # pragma: no cover
        pytest.skip("bitsandbytes is installed")


def test_rejects_unknown_quantization():
    with pytest.raises(ValueError, match="quantization"):
        quantize_base(tiny_bert(), "int3")
