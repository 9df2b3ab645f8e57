"""train(): end-to-end learning on tiny and real models, determinism, isolation, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyro
import pytest
import torch
from datasets import Dataset, DatasetDict

import pyro_monteclora
from pyro_monteclora import MonteCLoRA, MonteCLoRAConfig
from pyro_monteclora.testing import TOY_WORDS, tiny_bert, tiny_llama, toy_sentiment

from conftest import SHARED_DATA


def _toy(n=64):
    rows = toy_sentiment(n)
    return DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(toy_sentiment(16)))


def test_tiny_bert_learns_a_toy_task(word_tokenizer):
    result = pyro_monteclora.train(
        tiny_bert(vocab_size=16), _toy(), tokenizer=word_tokenizer, num_epochs=10, batch_size=8,
        learning_rate=5e-3, lora_r=4, progress=False,
    )
    assert result.evaluations[-1]["accuracy"] >= 0.9  # chance: 0.5
    assert len(result.history) == 10 * 8
    first, last = result.history[0], result.history[-1]
    assert last["nll"] < first["nll"]
    assert set(first) == {"step", "epoch", "lr", "loss", "nll", "kl", "cooperative"}
    assert all(r["kl"] >= 0 for r in result.history)


def _toy_completion(n=48):
    rows = []
    for i in range(n):
        word = TOY_WORDS[i % 8]
        rows.append({"prompt": f"{word} is", "completion": "positive" if i % 8 < 4 else "negative"})
    return rows


def test_tiny_llama_learns_a_toy_completion(word_tokenizer):
    result = pyro_monteclora.train(
        tiny_llama(vocab_size=16), _toy_completion(), tokenizer=word_tokenizer, num_epochs=6, batch_size=8,
        learning_rate=1e-2, lora_r=4, progress=False, eval_dataset=_toy_completion(16),
    )
    mc = result.model
    positive, negative = word_tokenizer.convert_tokens_to_ids(["positive", "negative"])
    correct = 0
    for i in range(8):
        word = TOY_WORDS[i]
        ids = word_tokenizer(f"{word} is")["input_ids"]
        logits = mc.mean_logits({"input_ids": torch.tensor([ids])})[0, -1]
        predicted = positive if logits[positive] > logits[negative] else negative
        correct += predicted == (positive if i < 4 else negative)
    assert correct == 8  # chance: 4 of 8
    assert result.evaluations[-1]["nll"] < result.evaluations[0]["nll"]


def test_multiple_choice_rows_train_by_sft_on_the_right_continuation():
    """With ``task="causal_lm"``, rows ``question``/``choices``/``label`` are trained as lm-eval's context -> the right choice (+ EOS),
    and training on them raises the right choice's log-likelihood against every other choice's."""
    from pyro_monteclora.data.tokenize import encode_prompt_completion, tokenize_causal_lm
    from pyro_monteclora.prediction.choices import score_choices
    from pyro_monteclora.testing import tiny_bpe_tokenizer

    tokenizer = tiny_bpe_tokenizer()
    words = [f"{c} {t}" for c in ("red", "blue", "green", "gold") for t in ("sky", "sea", "sun", "tea")]
    # the right answer is always "yes", at index 0, 1 or 2 among 2 or 3 choices: a pipeline that
    # trained on another choice than the label's would raise that choice instead
    orders = (["yes", "no"], ["no", "yes"], ["no", "maybe", "yes"], ["maybe", "yes", "no"])
    rows = [{"question": f"Is {w} warm?", "choices": orders[i % 4], "label": orders[i % 4].index("yes")}
            for i, w in enumerate(words)]
    expected = encode_prompt_completion(tokenizer, [f"Question: {r['question']}\nAnswer:" for r in rows],
                                        [" " + r["choices"][r["label"]] for r in rows])
    assert tokenize_causal_lm(Dataset.from_list(rows), tokenizer, 64) == expected

    def margins(model):  # (n, K): right choice's summed log-likelihood minus each choice's
        scores = score_choices(model, rows, mode="mean")["sample_log_likelihood"][0]
        return scores.gather(1, torch.tensor([[r["label"]] for r in rows])) - scores

    network = tiny_llama(vocab_size=len(tokenizer))
    before = margins(MonteCLoRA.from_model(network, lora_r=4, tokenizer=tokenizer))  # B = 0: the base model
    result = pyro_monteclora.train(network, rows, tokenizer=tokenizer, num_epochs=4, batch_size=4, task="causal_lm",
                                   learning_rate=2e-2, lora_r=4, progress=False, eval_every_epoch=False)
    assert result.config.task == "causal_lm"
    gained = margins(result.model) - before
    present = torch.isfinite(gained) & (gained != 0)  # absent choices and the right one itself
    assert present.sum() == 24 and (gained[present] > 0.1).all(), gained


def test_same_seed_same_run_and_global_rng_untouched(word_tokenizer):
    def run(seed):
        result = pyro_monteclora.train(
            tiny_bert(vocab_size=16), toy_sentiment(32), tokenizer=word_tokenizer, num_epochs=1, batch_size=8,
            lora_r=4, seed=seed, progress=False,
        )
        return result.history, {k: v.clone() for k, v in result.model.state_dict().items()}

    torch.manual_seed(123)
    state = torch.get_rng_state()
    history_a, weights_a = run(7)
    assert torch.equal(torch.get_rng_state(), state), "train() changed the caller's global RNG"
    history_b, weights_b = run(7)
    history_c, _ = run(8)
    assert history_a == history_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert history_a != history_c


def test_two_models_do_not_share_parameters(word_tokenizer):
    first = pyro_monteclora.train(
        tiny_bert(vocab_size=16), toy_sentiment(16), tokenizer=word_tokenizer, num_epochs=1, batch_size=8,
        lora_r=4, progress=False,
    ).model
    snapshot = {k: v.clone() for k, v in first.guide.state_dict().items()}
    second = pyro_monteclora.train(
        tiny_bert(vocab_size=16), toy_sentiment(16), tokenizer=word_tokenizer, num_epochs=1, batch_size=8,
        lora_r=4, progress=False,
    ).model
    assert all(torch.equal(snapshot[k], v) for k, v in first.guide.state_dict().items())
    assert not set(map(id, first.trainable_parameters())) & set(map(id, second.trainable_parameters()))
    assert not list(pyro.get_param_store().keys())


def test_continue_training_a_monteclora_model(word_tokenizer):
    result = pyro_monteclora.train(
        tiny_bert(vocab_size=16), toy_sentiment(16), tokenizer=word_tokenizer, num_epochs=1, batch_size=8,
        lora_r=4, progress=False,
    )
    again = pyro_monteclora.train(result.model, toy_sentiment(16), num_epochs=1, batch_size=8, progress=False)
    assert again.model is result.model and len(again.history) == 2


def test_train_is_callable_whatever_was_imported_first(tmp_path):
    script = (
        "import pyro_monteclora.train\n"
        "import pyro_monteclora.train.api\n"
        "import pyro_monteclora\n"
        "from pyro_monteclora import train as t\n"
        "import pyro_monteclora.train as m\n"
        "assert callable(pyro_monteclora.train) and callable(t) and callable(m)\n"
        "assert pyro_monteclora.train.ELBOLoss is not None\n"
        "from pyro_monteclora.testing import tiny_bert, toy_sentiment, toy_tokenizer\n"
        "tok = toy_tokenizer()\n"
        "r = pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(8), tokenizer=tok, num_epochs=1,"
        " batch_size=4, lora_r=4, progress=False)\n"
        "print(len(r.history))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2"


def test_local_json_and_csv_files(word_tokenizer, tmp_path):
    rows = toy_sentiment(8)
    (tmp_path / "data.json").write_text(json.dumps(rows))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "data.csv").write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows))
    for name in ("data.json", "data.jsonl", "data.csv"):
        result = pyro_monteclora.train(
            tiny_bert(vocab_size=16), str(tmp_path / name), tokenizer=word_tokenizer, num_epochs=1, batch_size=4,
            lora_r=4, progress=False,
        )
        assert len(result.history) == 2, name


def _bpe_tokenizer(texts, vocab_size=512):
    """A byte-level BPE tokenizer trained offline on the texts (a 30k vocab would dominate the step)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_text_pair_is_the_second_segment(word_tokenizer):
    from pyro_monteclora.data import tokenize_classification

    rows = Dataset.from_list([{"text": "the good", "text_pair": "is bad", "label": 1}])
    (example,) = tokenize_classification(rows, word_tokenizer, max_length=16, num_labels=2)
    assert word_tokenizer.decode(example["input_ids"]) == "[CLS] the good [SEP] is bad [SEP]"
    assert example["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_tiny_causal_lm_on_real_instruction_data():
    """Held-out per-token NLL of the mean adapter falls (a random frozen lm_head limits how far)."""
    from torch.utils.data import DataLoader

    from pyro_monteclora.data import format_instruction
    from pyro_monteclora.train import evaluate_mean
    from pyro_monteclora.train.batches import examples_dataset

    with open(os.path.join(SHARED_DATA, "math", "math_data.json")) as handle:
        rows = json.load(handle)[:240]
    assert {"instruction", "input", "output"} <= set(rows[0])
    tokenizer = _bpe_tokenizer([format_instruction(r) + r["output"] for r in rows])
    mc = MonteCLoRA.from_model(tiny_llama(vocab_size=len(tokenizer), hidden_size=32), lora_r=8)
    held_out, collator = examples_dataset(mc, rows[200:], tokenizer, max_length=256)
    before = evaluate_mean(mc, DataLoader(held_out, batch_size=8, collate_fn=collator))["nll"]
    result = pyro_monteclora.train(
        mc, rows[:200], tokenizer=tokenizer, num_epochs=2, batch_size=8, learning_rate=1e-2, max_length=256,
        progress=False, eval_dataset=rows[200:],
    )
    after = [e["nll"] for e in result.evaluations]
    assert before > after[0] > after[1] and before - after[1] > 0.05, (before, after)  # measured 6.242 -> 6.184 -> 6.162


@pytest.mark.slow
def test_minilm_beats_majority_on_held_out_vader_words():
    from transformers import AutoModelForSequenceClassification

    from pyro_monteclora.examples import load_vader, minilm_path

    data = load_vader(seed=0, test_size=1000, train_size=1000)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    result = pyro_monteclora.train(model, data, num_epochs=3, batch_size=32, progress=False)
    labels = data["test"]["label"]
    majority = max(sum(labels), len(labels) - sum(labels)) / len(labels)
    assert result.evaluations[-1]["accuracy"] >= majority + 0.10, (result.evaluations, majority)


# --- clear errors ------------------------------------------------------------------------


def test_error_unknown_target_module(word_tokenizer):
    with pytest.raises(ValueError, match=r"target_modules=\['not_a_layer'\].*query"):
        pyro_monteclora.train(tiny_bert(vocab_size=16), toy_sentiment(8), tokenizer=word_tokenizer,
                              target_modules=["not_a_layer"], progress=False)


def test_error_rank_larger_than_width_and_model_is_left_clean():
    model = tiny_bert(vocab_size=16)
    with pytest.raises(ValueError, match=r"lora_r=64 is larger than the width 16 of layer"):
        MonteCLoRA.from_model(model, lora_r=64)
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_error_model_without_linear_layers():
    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

    with pytest.raises(ValueError, match="no linear layers to adapt"):
        MonteCLoRA.from_model(Embedder(), task="classification")


def test_half_precision_logits_are_scored_in_float32():
    import pyro.poutine as poutine

    from pyro_monteclora.models import classification_likelihood

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.25]])
    labels = torch.tensor([0, 1])
    exact = poutine.trace(classification_likelihood).get_trace(logits, labels).log_prob_sum()
    half = poutine.trace(classification_likelihood).get_trace(logits.bfloat16(), labels).log_prob_sum()
    assert half.dtype == torch.float32 and torch.allclose(half, exact, atol=1e-6)


def test_error_empty_dataset(word_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        pyro_monteclora.train(tiny_bert(vocab_size=16), Dataset.from_list([]), tokenizer=word_tokenizer, progress=False)


def test_error_missing_columns(word_tokenizer):
    with pytest.raises(ValueError, match=r"needs columns text/label.*\['sentence', 'label'\]"):
        pyro_monteclora.train(tiny_bert(vocab_size=16), [{"sentence": "good", "label": 1}],
                              tokenizer=word_tokenizer, progress=False)
    with pytest.raises(ValueError, match="causal LM data needs columns instruction/output or prompt/completion"):
        pyro_monteclora.train(tiny_llama(vocab_size=16), [{"text": "good"}], tokenizer=word_tokenizer, progress=False)


def test_error_label_out_of_range(word_tokenizer):
    with pytest.raises(ValueError, match=r"the label in row 2 is 2, out of range .*num_labels=2"):
        pyro_monteclora.train(tiny_bert(vocab_size=16), [{"text": "good", "label": 1}, {"text": "bad", "label": 2}],
                              tokenizer=word_tokenizer, progress=False)


def test_error_unknown_override_and_bad_config_values():
    with pytest.raises(TypeError, match="unknown MonteCLoRAConfig field.*lora_rank"):
        MonteCLoRAConfig().replace(lora_rank=8)
    for field, value in [("lora_r", 0), ("lora_dropout", 1.5), ("sample_scaler", -1.0), ("num_components", 2.5),
                         ("task", "regression"), ("wishart_df", 3.0), ("kl_weight", -0.1), ("quantization", "int3")]:
        with pytest.raises(ValueError, match=f"{field}.*{value!r}".replace("(", r"\(").replace("[", r"\[")):
            MonteCLoRAConfig(**{field: value})


def test_config_round_trips_through_json():
    config = MonteCLoRAConfig(lora_r=8, target_modules=["query", "value"], wishart_df=9.0)
    assert MonteCLoRAConfig.from_dict(json.loads(config.to_json())) == config
