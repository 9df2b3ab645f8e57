"""Kohya export: key names, alpha = lora_alpha (scale kept), exact round trip."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pyro_monteclora import MonteCLoRA
from pyro_monteclora.io import save_pretrained
from pyro_monteclora.export.kohya import kohya_to_peft, peft_to_kohya
from pyro_monteclora.testing import nonzero_lora_b, tiny_llama

BATCH = {"input_ids": torch.tensor([[1, 5, 7, 3]])}


@pytest.fixture()
def adapter(tmp_path):
    mc = MonteCLoRA.from_model(tiny_llama(), lora_r=4, lora_alpha=12)  # alpha != r: scale 3
    nonzero_lora_b(mc.network)
    return save_pretrained(mc.eval(), tmp_path / "adapter"), mc


def test_keys_and_alpha(adapter, tmp_path):
    folder, mc = adapter
    path = peft_to_kohya(folder, str(tmp_path / "lora.safetensors"))
    tensors = load_file(path)
    name = "lora_model_layers_0_self_attn_q_proj"
    assert tensors[f"{name}.lora_down.weight"].shape == (4, 32)
    assert tensors[f"{name}.lora_up.weight"].shape[1] == 4
    assert float(tensors[f"{name}.alpha"]) == 12.0  # lora_alpha, not the rank 4
    down = mc.network.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").lora_A["default"].weight
    assert torch.equal(tensors[f"{name}.lora_down.weight"], down)
    alphas = [k for k in tensors if k.endswith(".alpha")]
    assert len(alphas) == 2 * 7 and all(float(tensors[k]) == 12.0 for k in alphas)


def test_round_trip_same_tensors_and_outputs(adapter, tmp_path):
    folder, mc = adapter
    path = peft_to_kohya(folder, str(tmp_path / "lora.safetensors"))
    back = kohya_to_peft(path, str(tmp_path / "back"))
    original = load_file(f"{folder}/adapter_model.safetensors")
    again = load_file(f"{back}/adapter_model.safetensors")
    assert sorted(original) == sorted(again)
    for key in original:
        assert torch.equal(original[key], again[key]), key
    model = PeftModel.from_pretrained(tiny_llama(), back).eval()
    assert torch.equal(model(**BATCH).logits, mc.mean_logits(BATCH))


def test_file_without_metadata_uses_module_names_and_keeps_scale(adapter, tmp_path):
    folder, mc = adapter
    path = peft_to_kohya(folder, str(tmp_path / "lora.safetensors"))
    bare = str(tmp_path / "bare.safetensors")
    save_file(load_file(path), bare)  # a Kohya file from another tool: no metadata
    with safe_open(bare, framework="pt") as handle:
        assert not handle.metadata()
    with pytest.raises(ValueError, match="module names"):
        kohya_to_peft(bare, str(tmp_path / "fails"))
    names = [n for n, _ in tiny_llama().named_modules()]
    back = kohya_to_peft(bare, str(tmp_path / "back"), module_names=names)
    model = PeftModel.from_pretrained(tiny_llama(), back).eval()
    torch.testing.assert_close(model(**BATCH).logits, mc.mean_logits(BATCH), atol=1e-6, rtol=0)
