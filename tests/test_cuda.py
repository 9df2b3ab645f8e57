"""CUDA-only checks (skipped without a GPU; ``benchmarks/device_check.py`` runs the wider set there)."""

from __future__ import annotations

import copy

import pytest
import torch

import pyro_monteclora
from pyro_monteclora.testing import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_mean_logits_take_a_cpu_batch_on_a_gpu_model(word_tokenizer):
    rows = [{"prompt": "the good is", "completion": "bad"}] * 8
    mc = pyro_monteclora.train(tiny_llama(vocab_size=16).to("cuda"), rows, tokenizer=word_tokenizer, num_epochs=1,
                               batch_size=4, lora_r=4, progress=False, seed=0).model
    batch = {"input_ids": torch.tensor([[2, 6, 3, 5]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        on_gpu = mc.mean_logits(batch).cpu()  # a CPU batch: moved to the network's device
        on_cpu = copy.deepcopy(mc).cpu().mean_logits(batch)
    assert torch.allclose(on_gpu, on_cpu, atol=1e-4)
