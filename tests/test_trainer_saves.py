"""What training writes: checkpoints kept under ``save_total_limit``, all through one function of io."""

from __future__ import annotations

import ast
import glob
import os

import torch

import pyro_monteclora
import pyro_monteclora.io
import pyro_monteclora.train.trainer as trainer_module
from conftest import REPO
from pyro_monteclora.testing import tiny_bert, toy_sentiment, toy_tokenizer


def test_save_total_limit_keeps_the_newest_checkpoints_and_each_loads(tmp_path, monkeypatch):
    calls = []

    def spy(save):
        def recording(monteclora, folder, **kwargs):
            calls.append((os.path.basename(os.fspath(folder)), bool(kwargs.get("checkpoint"))))
            return save(monteclora, folder, **kwargs)
        return recording

    monkeypatch.setattr(trainer_module, "save_trained", spy(trainer_module.save_trained))
    monkeypatch.setattr(pyro_monteclora.io, "save_trained", spy(pyro_monteclora.io.save_trained))
    out = tmp_path / "out"
    result = pyro_monteclora.train(
        tiny_bert(vocab_size=16), toy_sentiment(24), tokenizer=toy_tokenizer(), output_dir=str(out), save_steps=1,
        save_total_limit=2, num_epochs=2, batch_size=8, lora_r=4, learning_rate=1e-2, progress=False,
        merge_adapter=False,
    )
    assert [int(r["step"]) for r in result.history] == [1, 2, 3, 4, 5, 6]
    # training saved through save_trained alone: six checkpoints, then the output folder
    assert calls == [(f"checkpoint-{k}", True) for k in range(1, 7)] + [("out", False)]
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-5", "checkpoint-6"]
    loaded = {k: pyro_monteclora.load(tiny_bert(vocab_size=16), out / f"checkpoint-{k}") for k in (5, 6)}
    final = result.model.guide.state_dict()
    for name, value in final.items():  # the last checkpoint is the trained posterior; the one before is not
        assert torch.equal(loaded[6].guide.state_dict()[name], value), name
    assert any(not torch.equal(loaded[5].guide.state_dict()[n], v) for n, v in final.items())
    batch = {"input_ids": torch.tensor([[2, 4, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(loaded[6].mean_logits(batch), result.model.mean_logits(batch))


def test_the_training_code_imports_one_save_function_from_io():
    """Training (train() and the Trainer) saves through io.save_trained; no other writer is imported."""
    imported = set()
    for path in glob.glob(os.path.join(REPO, "pyro_monteclora", "train", "*.py")):
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith("io"):
                imported |= {alias.name for alias in node.names}
    writers = {name for name in imported if name.startswith(("save", "write"))}
    assert writers == {"save_trained"}
