"""CUDA check of the paths the calibration protocol uses, on tiny models (for the device tool's GPU).

Run from the repository root on a machine with a GPU::

    python -m benchmarks.device_check        # prints each comparison; exits 1 at the first failure

It checks, on CUDA: :func:`pyro_monteclora.train` (transformers' Trainer) trains and leaves the
model there; the mean adapter's logits equal those of the same weights on the CPU; the
posterior predictive (S = 4) is finite with non-zero mutual information;
:func:`pyro_monteclora.bayesianize` fits a LoRA on CUDA with A and B frozen; multiple-choice
scores on CUDA equal the CPU's. Tolerances are float32 round-off over
the tiny models' few operations (1e-4), not statistical.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model

import pyro_monteclora
from pyro_monteclora import bayesianize
from pyro_monteclora.data import encode_prompt_completion
from pyro_monteclora.prediction.shared_prompt import network_candidate_scores
from pyro_monteclora.testing import TOY_WORDS, nonzero_lora_b, tiny_llama, toy_tokenizer

ROWS = [{"prompt": "the good is", "completion": c} for c in ("good", "bad", "nice", "sad")] * 4


def _check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        sys.exit(1)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on the device tool's GPU machine")
    cuda = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(cuda)}", flush=True)
    tokenizer = toy_tokenizer(TOY_WORDS, tempfile.mkdtemp())
    batch = {"input_ids": torch.tensor([[2, 6, 3, 5], [2, 7, 4, 3]]), "attention_mask": torch.ones(2, 4, dtype=torch.long)}

    start = time.perf_counter()
    result = pyro_monteclora.train(tiny_llama(vocab_size=16).to(cuda), ROWS, tokenizer=tokenizer, num_epochs=2,
                                   batch_size=4, learning_rate=1e-2, lora_r=4, progress=False, seed=0)
    mc = result.model
    devices = {p.device.type for p in mc.parameters()}
    finite = all(torch.isfinite(torch.tensor([r["nll"], r["kl"]])).all() for r in result.history)
    _check("train on CUDA", devices == {"cuda"} and finite,
           f"{len(result.history)} steps in {time.perf_counter() - start:.1f} s, parameters on {devices}")

    with torch.no_grad():
        on_gpu = mc.mean_logits(batch).cpu()
        on_cpu = copy.deepcopy(mc).cpu().mean_logits(batch)
    gap = float((on_gpu - on_cpu).abs().max())
    _check("mean logits CUDA = CPU", gap < 1e-4, f"max |difference| {gap:.2e}")

    out = pyro_monteclora.Predictive(mc, num_samples=4, seed=0)(batch)
    mi = out["mutual_information"]
    _check("posterior predictive on CUDA", bool(torch.isfinite(out["probs"]).all()) and float(mi.max()) > 0,
           f"probs on {out['probs'].device}, max MI {float(mi.max()):.2e}")

    lora = get_peft_model(tiny_llama(vocab_size=16), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                  target_modules="all-linear", task_type="CAUSAL_LM"))
    nonzero_lora_b(lora)
    lora = lora.to(cuda).eval()
    frozen = {k: v.clone() for k, v in lora.state_dict().items() if "lora_" in k}
    fit = bayesianize(lora, ROWS, tokenizer=tokenizer, num_epochs=2, batch_size=4, learning_rate=5e-2,
                      sample_scaler=0.3, progress=False).model
    state = {k.replace("base_model.model.", "", 1): v for k, v in fit.network.state_dict().items()}
    kept = all(torch.equal(state[k.replace("base_model.model.", "", 1)], v) for k, v in frozen.items())
    _check("bayesianize on CUDA", kept and {p.device.type for p in fit.parameters()} == {"cuda"},
           f"{len(frozen)} LoRA tensors frozen exactly")

    scored = encode_prompt_completion(tokenizer, ["the good is"] * 2 + ["the sad is"] * 2, ["good", "bad"] * 2)
    with torch.no_grad():
        gpu_scores = network_candidate_scores(mc.network, scored, 2, tokenizer.pad_token_id).cpu()
        cpu_scores = network_candidate_scores(copy.deepcopy(mc.network).cpu(), scored, 2, tokenizer.pad_token_id)
    gap = float((gpu_scores - cpu_scores).abs().max())
    _check("multiple-choice scores CUDA = CPU", gap < 1e-4, f"max |difference| {gap:.2e}")
    print("DEVICE CHECK OK", flush=True)


if __name__ == "__main__":
    main()
