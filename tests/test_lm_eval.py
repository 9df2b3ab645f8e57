"""Multiple-choice scoring against the real lm-evaluation-harness (not a copy of its formulas).

The reference is lm-eval 0.4.x's ``HFLM`` on the same peft network (the mean adapter), run by
``simple_evaluate`` on a local YAML task over a JSON Lines file: per-choice log-likelihoods
within 1e-4, ``acc`` / ``acc_norm`` equal. Rows have 2 to 5 choices. The tiny Llama has LoRA
B != 0 (B = 0 would hide the adapter) and a real byte-level BPE tokenizer that adds BOS.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pyro_monteclora import MonteCLoRA, evaluate  # noqa: E402
from pyro_monteclora.data.choices import context, continuations  # noqa: E402
from pyro_monteclora.data.tokenize import encode_context_continuation  # noqa: E402
from pyro_monteclora.prediction.choices import score_choices  # noqa: E402
from pyro_monteclora.prediction.draws import log_mean_exp  # noqa: E402
from pyro_monteclora.prediction.harness import MonteCLoRALM  # noqa: E402
from pyro_monteclora.prediction.predictive import Predictive  # noqa: E402
from pyro_monteclora.data.tokenize import batches  # noqa: E402
from pyro_monteclora.testing import nonzero_lora_b, tiny_bpe_tokenizer, tiny_llama  # noqa: E402

TASK = "tiny_mc"
ROWS = [
    {"question": "Is the sky blue?", "choices": ["yes", "no"], "label": 0},
    {"question": "Which is a colour?", "choices": ["red", "dog", "run"], "label": 0},
    {"question": "Pick the number.", "choices": ["cat", "seven", "tree", "blue"], "label": 1},
    {"question": "Which animal barks?", "choices": ["a cat", "a dog", "a fish", "a bird", "a cow"], "label": 1},
    {"question": "Two plus two is", "choices": ["four", "five"], "label": 0},
    {"question": "Opposite of hot?", "choices": ["warm", "cold", "very hot"], "label": 1},
    {"question": "Which is a fruit?", "choices": ["apple", "car", "stone", "lamp"], "label": 0},
    {"question": "Capital of France?", "choices": ["Rome", "Paris", "Berlin", "Madrid", "Oslo"], "label": 1},
    {"question": "Water freezes at", "choices": ["zero degrees", "ten degrees"], "label": 0},
    {"question": "What do bees make?", "choices": ["milk", "honey", "silk"], "label": 1},
]


def write_task(folder, rows, name=TASK) -> str:
    """A local lm-eval multiple-choice task over a JSON Lines file (offline: lm-eval's own tasks download)."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8",
    )
    return str(folder)


def harness(lm, folder, name=TASK) -> tuple[dict, list[list[tuple[float, bool]]]]:
    """lm-eval's aggregate ``acc``/``acc_norm`` and, per row, its ``(log-likelihood, is_greedy)`` per choice."""
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=folder, include_defaults=False))
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    results = out["results"][name]
    return ({"acc": results["acc,none"], "acc_norm": results["acc_norm,none"]},
            [[(float(ll), bool(g)) for ll, g in s["filtered_resps"]] for s in samples])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = tiny_bpe_tokenizer()
    mc = MonteCLoRA.from_model(tiny_llama(vocab_size=len(tokenizer)), lora_r=4, tokenizer=tokenizer)
    nonzero_lora_b(mc.network, std=0.3)
    mc.eval()
    folder = write_task(tmp_path_factory.mktemp("task"), ROWS)
    reference = harness(HFLM(pretrained=mc.network, tokenizer=tokenizer, batch_size=4), folder)
    return mc, tokenizer, folder, reference


def test_the_comparison_is_not_vacuous(setup):
    """Not a vacuous comparison: lm-eval's answers differ from uniform, and the LoRA changes the scores."""
    mc, tokenizer, folder, (_, per_row) = setup
    assert len({round(ll, 3) for row in per_row for ll, _ in row}) > 20
    plain = score_choices(mc, ROWS, mode="mean")["sample_log_likelihood"]
    with mc.network.disable_adapter():
        without = score_choices(mc, ROWS, mode="mean")["sample_log_likelihood"]
    assert (plain - without)[torch.isfinite(plain)].abs().max() > 1e-2


def test_mean_adapter_scores_equal_lm_eval_hflm(setup):
    mc, _, _, (metrics, per_row) = setup
    scores = score_choices(mc, ROWS, mode="mean", batch_size=5)["sample_log_likelihood"][0]
    for i, row in enumerate(ROWS):
        ours = scores[i, : len(row["choices"])]
        theirs = torch.tensor([ll for ll, _ in per_row[i]])
        assert torch.allclose(ours.double(), theirs.double(), atol=1e-4), (i, ours, theirs)
        assert torch.isneginf(scores[i, len(row["choices"]):]).all()  # an absent choice
    result = evaluate(mc, ROWS, num_samples=3)
    assert result["mean"]["accuracy"] == pytest.approx(metrics["acc"], abs=1e-12)
    assert result["mean"]["accuracy_norm"] == pytest.approx(metrics["acc_norm"], abs=1e-12)
    assert set(result["predictive"]) == {"accuracy", "accuracy_norm", "nll", "brier", "ece", "aurc"}


def test_our_lm_in_mean_mode_equals_hflm(setup):
    mc, tokenizer, folder, (metrics, per_row) = setup
    ours_metrics, ours = harness(MonteCLoRALM(mc, tokenizer=tokenizer, num_samples=0, batch_size=7), folder)
    assert ours_metrics == metrics
    for mine, theirs in zip(ours, per_row):
        assert [g for _, g in mine] == [g for _, g in theirs]
        assert max(abs(a - b) for (a, _), (b, _) in zip(mine, theirs)) < 1e-4


def test_our_lm_returns_the_posterior_predictive_log_likelihood(setup):
    """log (1/S) sum_s p(c | x, A_s), checked against full forward passes with the same S draws."""
    mc, tokenizer, _, _ = setup
    requests = [Instance("loglikelihood", {}, (context(r), c), i) for i, r in enumerate(ROWS) for c in continuations(r)]
    lm = MonteCLoRALM(mc, tokenizer=tokenizer, num_samples=3, seed=5, batch_size=6)
    got = torch.tensor([ll for ll, _ in lm.loglikelihood(requests)], dtype=torch.float64)
    examples = encode_context_continuation(tokenizer, [r.args[0] for r in requests], [r.args[1] for r in requests])
    full = Predictive(mc, num_samples=3, seed=5, vectorize=False)
    per_draw = torch.cat([full.sample_sequence_log_likelihood(b) for b in batches(examples, 0, 4)], dim=1)
    assert per_draw.shape == (3, len(requests))
    assert (per_draw.max(0).values - per_draw.min(0).values).max() > 1e-4  # the draws differ
    assert torch.allclose(got, log_mean_exp(per_draw), atol=1e-4)
    mean = torch.tensor([ll for ll, _ in MonteCLoRALM(mc, tokenizer=tokenizer, num_samples=0).loglikelihood(requests)])
    assert (got - mean.double()).abs().max() > 1e-5


def test_rolling_log_likelihood_equals_hflm_in_mean_mode(setup):
    """Several 16-token windows per text. (Text that repeats itself is left out: lm-eval then reuses one
    window's logits for another whose tokens match, and its last window departs from a plain forward
    pass, which ours equals.)"""
    mc, tokenizer, _, _ = setup
    texts = ["Question: Is the sky blue? Answer: yes.", "a",
             "Which animal barks? a dog. Capital of France? Paris. Two plus two is four. What do bees make? honey.",
             "Water freezes at zero degrees; the quick brown fox jumps over the lazy dog seven times."]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    theirs = HFLM(pretrained=mc.network, tokenizer=tokenizer, batch_size=4, max_length=16).loglikelihood_rolling(requests)
    ours = MonteCLoRALM(mc, tokenizer=tokenizer, num_samples=0, max_length=16).loglikelihood_rolling(requests)
    assert len(tokenizer(texts[2])["input_ids"]) > 3 * 16  # several windows
    assert ours == pytest.approx(theirs, abs=1e-4)
    sampled = MonteCLoRALM(mc, tokenizer=tokenizer, num_samples=2, max_length=16).loglikelihood_rolling(requests)
    assert all(math.isfinite(v) for v in sampled) and sampled != pytest.approx(ours, abs=1e-6)


def test_generation_is_refused_with_a_clear_error(setup):
    mc, tokenizer, _, _ = setup
    with pytest.raises(NotImplementedError, match="generation tasks are not supported"):
        MonteCLoRALM(mc, tokenizer=tokenizer).generate_until([Instance("generate_until", {}, ("Q", {}), 0)])


def test_bad_rows_get_one_clear_error_naming_the_row(setup):
    mc = setup[0]
    with pytest.raises(ValueError, match=r"row 1: 'choices' is empty"):
        evaluate(mc, [ROWS[0], {"question": "q", "choices": [], "label": 0}], num_samples=1)
    with pytest.raises(ValueError, match=r"row 0: label 3 is out of range for 2 choices"):
        evaluate(mc, [{**ROWS[0], "label": 3}], num_samples=1)


def test_lm_eval_command_runs_our_model_from_saved_folders(setup, tmp_path, capsys):
    """`pyro-monteclora lm-eval --model monteclora --model_args pretrained=BASE,adapter=FOLDER,...`."""
    from pyro_monteclora.cli import main

    mc, tokenizer, folder, (metrics, _) = setup
    base = tmp_path / "base"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(base)
    adapter = mc.save_pretrained(str(tmp_path / "adapter"))
    assert lm_eval.api.registry.get_model("monteclora") is MonteCLoRALM
    code = main(["lm-eval", "run", "--model", "monteclora", "--model_args",
                 f"pretrained={base},adapter={adapter},num_samples=0", "--tasks", TASK, "--include_path", folder,
                 "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "out")])
    assert code == 0
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())["results"][TASK]
    assert results["acc,none"] == metrics["acc"] and results["acc_norm,none"] == metrics["acc_norm"]
    assert main(["lm-eval", "run", "--model", "monteclora", "--model_args", f"pretrained={base}", "--tasks", TASK,
                 "--include_path", folder, "--device", "cpu"]) == 1
    assert "adapter=" in capsys.readouterr().err


def test_network_choice_scores_of_the_peft_network_are_the_mean_adapters(setup):
    """Any causal LM (here the peft network itself) scored like lm-eval, ragged rows, repeated."""
    from pyro_monteclora.prediction.choices import network_choice_scores

    mc, tokenizer, _, _ = setup
    mean = score_choices(mc, ROWS, mode="mean")["sample_log_likelihood"]
    plain = network_choice_scores(mc.network, ROWS, tokenizer, repeats=2, batch_size=5)
    assert plain["sample_log_likelihood"].shape == (2, len(ROWS), 5)
    finite = torch.isfinite(mean[0])
    assert torch.equal(finite, torch.isfinite(plain["sample_log_likelihood"][1]))
    for draw in plain["sample_log_likelihood"]:  # eval mode: both repeats are the mean adapter
        assert torch.allclose(draw[finite], mean[0][finite], atol=1e-4)
