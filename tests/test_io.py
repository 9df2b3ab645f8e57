"""Saving and loading: standard peft files for the mean, exact restore of the Bayesian adapter."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pyro_monteclora import MonteCLoRA, __version__
from pyro_monteclora.io import (
    CONFIG_NAME,
    POSTERIOR_NAME,
    load,
    save_merged,
    save_pretrained,
    save_result,
)
from pyro_monteclora.testing import nonzero_lora_b, tiny_bert, tiny_llama, toy_sentiment
from pyro_monteclora.train import TrainResult, train

BATCH = {"input_ids": torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}


def _trained_like(make, **overrides):
    """A MonteCLoRA whose B, head and variational parameters are all away from their init."""
    mc = MonteCLoRA.from_model(make(), lora_r=4, lora_alpha=12, **overrides)
    nonzero_lora_b(mc.network)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in mc.named_parameters():
            if "posteriors" in name or "modules_to_save" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return mc.eval()


def _state(mc):
    tensors = {k: v for k, v in mc.network.state_dict().items() if "lora_" in k or "modules_to_save" in k}
    tensors.update({f"guide.{k}": v for k, v in mc.guide.state_dict().items()})
    return tensors


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_round_trip_restores_every_tensor_and_the_predictive(make, tmp_path):
    mc = _trained_like(make)
    folder = save_pretrained(mc, tmp_path / "adapter")
    assert sorted(os.listdir(folder)) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", CONFIG_NAME, POSTERIOR_NAME]
    )
    again = load(make(), folder)
    before, after = _state(mc), _state(again)
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(mc.mean_logits(BATCH), again.mean_logits(BATCH))
    for seed in (0, 1):
        torch.manual_seed(seed)
        first = mc.sample_logits(BATCH)
        torch.manual_seed(seed)
        second = again.sample_logits(BATCH)
        assert torch.equal(first, second)
    assert not torch.allclose(first, mc.mean_logits(BATCH))  # the draw is not the mean: the test can fail


def test_predictive_with_same_seed_is_identical_after_reload(tmp_path):
    from pyro_monteclora.prediction.predictive import Predictive

    mc = _trained_like(tiny_bert)
    again = load(tiny_bert(), save_pretrained(mc, tmp_path / "a"))
    first = Predictive(mc, num_samples=4, seed=7)(BATCH)
    second = Predictive(again, num_samples=4, seed=7)(BATCH)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_stock_peft_loads_the_mean_adapter(tmp_path):
    mc = _trained_like(tiny_bert)
    folder = save_pretrained(mc, tmp_path / "adapter")
    stock = PeftModel.from_pretrained(tiny_bert(), folder).eval()
    assert torch.equal(stock(**BATCH).logits, mc.mean_logits(BATCH))


def test_config_json_is_sorted_and_versioned(tmp_path):
    mc = _trained_like(tiny_bert, num_components=3)
    folder = save_pretrained(mc, tmp_path / "adapter")
    text = open(os.path.join(folder, CONFIG_NAME)).read()
    meta = json.loads(text)
    assert text == json.dumps(meta, sort_keys=True, indent=2) + "\n"
    assert meta["pyro_monteclora_version"] == __version__
    assert meta["config"]["num_components"] == 3 and meta["task"] == "classification"
    assert set(load_file(os.path.join(folder, POSTERIOR_NAME))) == set(mc.guide.state_dict())
    card = open(os.path.join(folder, "README.md")).read()
    assert "library_name: peft" in card and "num_components" in card


@pytest.mark.parametrize(
    "make, auto", [(tiny_bert, AutoModelForSequenceClassification), (tiny_llama, AutoModelForCausalLM)], ids=["bert", "llama"]
)
def test_merged_output_equals_mean_and_leaves_model_intact(make, auto, tmp_path):
    mc = _trained_like(make)
    before = {k: v.clone() for k, v in mc.state_dict().items()}
    folder = save_merged(mc, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "README.md", "adapter"} <= set(os.listdir(folder))
    merged = auto.from_pretrained(folder).eval()
    torch.testing.assert_close(merged(**BATCH).logits, mc.mean_logits(BATCH), atol=1e-5, rtol=0)
    after = mc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = load(make(), folder)  # the adapter beside the merged model restores the Bayesian adapter
    assert torch.equal(again.mean_logits(BATCH), mc.mean_logits(BATCH))


def test_save_result_honors_merge_adapter(tmp_path, word_tokenizer):
    result = train(tiny_bert(vocab_size=len(word_tokenizer)), toy_sentiment(16), tokenizer=word_tokenizer,
                   lora_r=4, num_epochs=1, batch_size=8, progress=False)
    merged = save_result(result, tmp_path / "merged")
    assert os.path.isfile(os.path.join(merged, "model.safetensors"))
    assert os.path.isfile(os.path.join(merged, "adapter", POSTERIOR_NAME))
    assert os.path.isfile(os.path.join(merged, "tokenizer_config.json"))
    assert "train_loss" in open(os.path.join(merged, "README.md")).read()
    adapter_only = TrainResult(result.model, result.history, result.evaluations, result.config.replace(merge_adapter=False))
    folder = save_result(adapter_only, tmp_path / "adapter")
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(folder, POSTERIOR_NAME))


def test_refuses_foreign_folder_and_replaces_own_output(tmp_path):
    mc = _trained_like(tiny_bert)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pretrained(mc, foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"
    save_pretrained(mc, foreign, overwrite=True)
    assert not (foreign / "precious.txt").exists()
    own = save_pretrained(mc, tmp_path / "own")
    save_pretrained(mc, own)  # a previous output is replaced without overwrite=True
    assert os.path.isfile(os.path.join(own, CONFIG_NAME))


def test_failed_save_leaves_existing_folder_untouched(tmp_path, monkeypatch):
    import pyro_monteclora.io.save as io_save

    mc = _trained_like(tiny_bert)
    folder = save_pretrained(mc, tmp_path / "adapter")
    original = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io_save, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(mc, folder)
    assert {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)} == original
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folder left behind


class _Payload:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_pickle_is_ever_loaded(tmp_path):
    mc = _trained_like(tiny_bert)
    folder = save_pretrained(mc, tmp_path / "adapter")
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    for name in ("adapter_model.bin", "pytorch_model.bin", "monteclora_posterior.bin"):
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(_Payload(), handle)
    load(tiny_bert(), folder)  # planted pickles beside the safetensors are ignored
    assert not marker.exists()
    os.remove(os.path.join(folder, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        load(tiny_bert(), folder)
    assert not marker.exists()


def test_load_rejects_another_base_model(tmp_path):
    folder = save_pretrained(_trained_like(tiny_bert), tmp_path / "adapter")
    with pytest.raises(ValueError, match="the base model does not fit the adapter.*adapted layers differ"):
        load(tiny_bert(hidden_size=24), folder)


def test_check_writable_probes_an_existing_output_folder_and_refuses_a_dangling_link(tmp_path, monkeypatch):
    import tempfile

    from pyro_monteclora.io.atomic import check_writable

    out = tmp_path / "out"
    out.mkdir()  # exists and is empty: the checkpoints go inside it, the finished output next to it
    real = tempfile.TemporaryFile

    def refuse_inside_out(*args, dir=None, **kwargs):  # as root, modes are not enforced: refuse by path
        if dir is not None and os.path.abspath(dir) == str(out):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse_inside_out)
    with pytest.raises(PermissionError, match=f"cannot write to {out}: Permission denied"):
        check_writable(out, overwrite=False)
    assert check_writable(tmp_path / "other", overwrite=False) == str(tmp_path / "other")  # the parent is writable
    monkeypatch.setattr(tempfile, "TemporaryFile", real)

    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="gone is a link to .*missing.*, which does not exist"):
        check_writable(link / "deep" / "out", overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["gone", "out"]  # nothing created
