"""The ``pyro-monteclora`` console script, driven through its real entry point on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pyro_monteclora import MonteCLoRAConfig
from pyro_monteclora.cli import _config_overrides, build_parser
from pyro_monteclora.testing import TOY_WORDS, tiny_bert, toy_sentiment, toy_tokenizer

SCRIPT = os.path.join(os.path.dirname(sys.executable), "pyro-monteclora")
COMMAND = [SCRIPT] if os.path.isfile(SCRIPT) else [sys.executable, "-m", "pyro_monteclora.cli"]
SECRET = "hf_ThisIsNotARealTokenButMustNeverBePrinted"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("HF_TOKEN", None)
    return env


def _start(*args, cwd):
    return subprocess.Popen(
        COMMAND + list(args), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = toy_tokenizer(TOY_WORDS, str(root))
    tiny_bert(vocab_size=len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    data = root / "data"
    data.mkdir()
    for split, rows in (("train", toy_sentiment(32)), ("test", toy_sentiment(8))):
        with open(data / f"{split}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    return root


def test_every_subcommand_end_to_end(workspace):
    root = str(workspace)
    code, out, err = _finish(
        _start("train", "--model", "base", "--data", "data", "--output-dir", "out", "--lora-r", "4", "--lora-alpha", "8",
               "--epochs", "1", "--batch-size", "8", "--lr", "5e-3", "--num-components", "3", cwd=root)
    )
    assert code == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["merged"] is True and "eval_accuracy" in summary["metrics"]
    assert "MonteCLoRA" in err  # the tqdm bar
    assert os.path.isfile(os.path.join(root, "out", "model.safetensors"))
    meta = json.load(open(os.path.join(root, "out", "adapter", "monteclora_config.json")))
    assert meta["config"]["lora_r"] == 4 and meta["config"]["num_components"] == 3 and meta["config"]["lora_alpha"] == 8

    jobs = {
        "evaluate": _start("evaluate", "--adapter-path", "out", "--data", "data/test.jsonl", "--num-samples", "2", cwd=root),
        "predict": _start("predict", "--adapter-path", "out", "--text", "the good", "--text", "sad is", cwd=root),
        "inspect": _start("inspect", "--adapter-path", "out", cwd=root),
        "merge": _start("merge", "--base-model-path", "base", "--adapter-path", "out", "--output-folder", "merged", cwd=root),
        "kohya": _start("convert-kohya", "--adapter-path", "out", "--output", "lora.safetensors", cwd=root),
    }
    results = {name: _finish(job) for name, job in jobs.items()}

    code, out, err = results["evaluate"]
    assert code == 0, err[-2000:]
    metrics = json.loads(out)
    assert set(metrics) == {"mean", "predictive"} and 0 <= metrics["predictive"]["accuracy"] <= 1

    code, out, err = results["predict"]
    assert code == 0, err[-2000:]
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["text"] for r in rows] == ["the good", "sad is"]
    assert all(abs(sum(r["probs"]) - 1) < 1e-5 and r["mutual_information"] >= 0 for r in rows)

    code, out, err = results["inspect"]
    assert code == 0, err[-2000:]
    assert "total extra parameters" in out and "N = 3 components" in out

    code, out, err = results["merge"]
    assert code == 0, err[-2000:]
    from transformers import AutoModelForSequenceClassification

    from pyro_monteclora.io import load

    merged = AutoModelForSequenceClassification.from_pretrained(os.path.join(root, "merged")).eval()
    bayes = load(os.path.join(root, "base"), os.path.join(root, "out"))
    batch = {"input_ids": torch.tensor([[2, 4, 12, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    torch.testing.assert_close(merged(**batch).logits, bayes.mean_logits(batch), atol=1e-5, rtol=0)

    code, out, err = results["kohya"]
    assert code == 0, err[-2000:]
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(root, "lora.safetensors"))
    alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
    assert alphas and set(alphas) == {8.0}



def test_push_to_hub_never_prints_the_token(workspace, capfd, caplog, monkeypatch):
    """--push-to-hub cannot reach the Hub here: it must fail in one line without showing the token."""
    from pyro_monteclora.cli import main
    from pyro_monteclora.io import save_pretrained
    from pyro_monteclora import MonteCLoRA

    for name, value in _env().items():
        monkeypatch.setenv(name, value)
    adapter = save_pretrained(MonteCLoRA.from_model(tiny_bert(vocab_size=17), lora_r=4), str(workspace / "push-adapter"),
                              overwrite=True)
    caplog.set_level("DEBUG")
    code = main(["merge", "--base-model-path", str(workspace / "base"), "--adapter-path", adapter,
                 "--push-to-hub", "someone/repo", "--token", SECRET])
    out, err = capfd.readouterr()
    assert code == 1
    assert SECRET not in out and SECRET not in err and SECRET not in caplog.text
    assert err.strip().splitlines()[-1].startswith("pyro-monteclora merge: error:")


def test_bad_arguments_are_one_clear_line(workspace, capsys):
    from pyro_monteclora.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line, exit 2
        main(["merge", "--base-model-path", "base", "--adapter-path", "out"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--output-folder" in err and "--push-to-hub" in err
    code = main(["train", "--model", str(workspace / "base"), "--data", str(workspace / "missing.jsonl"),
                 "--output-dir", str(workspace / "o2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "missing.jsonl" in err[0]


def test_help_lists_every_flag_with_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"train", "evaluate", "predict", "merge", "convert-kohya", "inspect", "lm-eval"}
    for name, sub in subparsers.items():
        if name == "lm-eval":
            continue  # every argument is lm-eval's own (its --help lists them)
        for action in sub._actions:
            if action.dest != "help":
                assert action.help and ("default" in action.help or action.required), (name, action.dest)
    text = subparsers["train"].format_help()
    for flag in ("--model", "--data", "--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules", "--quantization",
                 "--merge-adapter", "--no-merge-adapter", "--epochs", "--lr", "--batch-size", "--num-components",
                 "--sample-scaler", "--kl-weight", "--cooperative-weight"):
        assert flag in text, flag
    assert "(default: 16)" in text  # lora_r, from MonteCLoRAConfig


def test_flags_map_onto_the_config():
    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--output-dir", "o"])
    assert MonteCLoRAConfig().replace(**_config_overrides(args)) == MonteCLoRAConfig()
    args = parser.parse_args(
        ["train", "--data", "d", "--output-dir", "o", "--lora-r", "8", "--lr", "0.01", "--epochs", "2",
         "--target-modules", "query", "value", "--quantization", "int8", "--no-merge-adapter", "--wishart-df", "none"]
    )
    config = MonteCLoRAConfig().replace(**_config_overrides(args))
    assert (config.lora_r, config.learning_rate, config.num_epochs) == (8, 0.01, 2)
    assert config.target_modules == ["query", "value"] and config.quantization == "int8"
    assert config.merge_adapter is False and config.wishart_df is None
    flagged = {a.dest for a in next(a for a in parser._actions if a.dest == "command").choices["train"]._actions}
    assert {f.name for f in dataclasses.fields(MonteCLoRAConfig)} - {"output_dir"} <= flagged


def test_errors_are_one_line(tmp_path, capsys):
    from pyro_monteclora.cli import main

    code = main(["convert-kohya", "--adapter-path", str(tmp_path), "--output", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("pyro-monteclora convert-kohya: error: no peft adapter")


def test_predict_and_evaluate_a_causal_lm_by_its_candidate_answers(tmp_path, capsys):
    """A causal-LM adapter: predict scores --candidate completions of --text prompts, or the answers of
    instruction rows; evaluate scores instruction rows by multiple choice."""
    from pyro_monteclora import MonteCLoRA, save_pretrained
    from pyro_monteclora.cli import main
    from pyro_monteclora.testing import tiny_llama

    tokenizer = toy_tokenizer(TOY_WORDS + ["true", "false", "correct", "answer"], str(tmp_path))
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    mc = MonteCLoRA.from_model(tiny_llama(vocab_size=len(tokenizer)), lora_r=4)
    mc.tokenizer = tokenizer
    save_pretrained(mc, tmp_path / "adapter")
    common = ["--adapter-path", str(tmp_path / "adapter"), "--base-model", str(tmp_path / "base"), "--num-samples", "3"]
    assert main(["predict", *common, "--text", "the good", "--candidate", "true", "--candidate", "false"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["candidates"] == ["true", "false"] and abs(sum(line["probs"]) - 1) < 1e-5
    assert line["prediction"] == line["candidates"][max(range(2), key=lambda i: line["probs"][i])]
    rows = [{"instruction": "the good is\n\nAnswer format: true/false", "input": ""},
            {"instruction": "the bad is\n\nAnswer format: true/false", "input": "", "output": "the correct answer is false",
             "answer": "false"}]
    with open(tmp_path / "rows.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    assert main(["predict", *common, "--data", str(tmp_path / "rows.jsonl")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["candidates"] for x in lines] == [["the correct answer is true", "the correct answer is false"]] * 2
    assert main(["predict", *common, "--text", "the good", "--candidate", "true"]) == 1
    assert "at least two --candidate" in capsys.readouterr().err
    with open(tmp_path / "labelled.jsonl", "w") as handle:
        handle.write(json.dumps(rows[1]) + "\n" + json.dumps({**rows[1], "answer": "true", "output": "the correct answer is true"}) + "\n")
    assert main(["evaluate", *common, "--data", str(tmp_path / "labelled.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"mean", "predictive"} and 0 <= metrics["predictive"]["accuracy"] <= 1


def test_train_a_causal_lm_by_the_multiple_choice_likelihood(tmp_path, capsys):
    """``train --task multiple_choice`` on question/choices/label rows: a causal-LM adapter whose
    training history shows the Categorical's NLL per row (bounded by ln K at the start), loadable as usual."""
    import pyro_monteclora
    from pyro_monteclora.cli import main
    from pyro_monteclora.testing import tiny_llama

    tokenizer = toy_tokenizer(TOY_WORDS + ["yes", "no"], str(tmp_path))
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rows = [{"question": f"is {w} good", "choices": ["yes", "no"] if i % 2 else ["no", "yes"], "label": i % 2}
            for i, w in enumerate(TOY_WORDS * 2)]
    with open(tmp_path / "rows.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    code = main(["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "rows.jsonl"), "--task",
                 "multiple_choice", "--choice-score", "per_char", "--epochs", "1", "--batch-size", "4", "--lora-r",
                 "4", "--output-dir", str(tmp_path / "out"), "--no-merge-adapter"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "monteclora_config.json").read_text())
    assert config["config"]["task"] == "multiple_choice" and config["config"]["choice_score"] == "per_char"
    loaded = pyro_monteclora.load(tiny_llama(vocab_size=len(tokenizer)), str(tmp_path / "out"))
    assert loaded.task == "causal_lm"
    # without --task the rows decide, as in train(): choice rows train by their likelihood
    assert main(["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "rows.jsonl"), "--epochs", "1",
                 "--lora-r", "4", "--output-dir", str(tmp_path / "auto"), "--no-merge-adapter"]) == 0
    assert json.loads((tmp_path / "auto" / "monteclora_config.json").read_text())["config"]["task"] == "multiple_choice"
    with pytest.raises(SystemExit):  # argparse: one line naming the choices
        main(["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "rows.jsonl"), "--task",
              "multiple_choice", "--choice-score", "mean", "--output-dir", str(tmp_path / "bad")])
    assert "invalid choice: 'mean' (choose from 'sum', 'per_char')" in capsys.readouterr().err
    with open(tmp_path / "sft.jsonl", "w") as handle:  # rows of another kind: one error naming the columns
        handle.write(json.dumps({"prompt": "the good", "completion": "yes"}) + "\n")
    assert main(["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "sft.jsonl"), "--task",
                 "multiple_choice", "--output-dir", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert "task='multiple_choice' trains on rows with question" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
