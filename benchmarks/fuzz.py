"""Generated bad input (issue #30): rows, data files, multiple-choice rows, config values and CLI arguments.

Each target draws inputs with ``hypothesis`` (near-valid rows with one field broken, wrong types,
empty values, NaN, out-of-range labels, odd unicode, huge fields, empty and garbled files) and
feeds them to the code a run starts with. Every input must end either accepted (then the rows
are checked to be valid) or in one of our errors: raised by pyro_monteclora's code (not a raw
library traceback) and naming the bad value, field, row or flag; and nothing may be written.
``tests/test_fuzz.py`` runs a few hundred cases; ``python -m benchmarks.faults --fuzz N`` runs
N per target and reports the counts.

Example:
    >>> counts = run_all(3, seed=0)
    >>> sorted(counts) == sorted(TARGETS) and all(n == 3 for n in counts.values())
    True
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
import traceback
from typing import Any, Callable, Optional

from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings, strategies as st

import pyro_monteclora

PACKAGE_DIR = os.path.dirname(os.path.abspath(pyro_monteclora.__file__))
OUR_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)
WORDS = ["good", "bad", "is", "the"]

# --- values ---------------------------------------------------------------------------------------

ODD = ["", " ", "\u0000", "\u200b", "é", "e\u0301", "\U0001f600", "\ufeff", "\ud7ff", "\n\r\t", "\u202e", "Ω" * 3]
text = st.one_of(st.sampled_from(WORDS), st.text(max_size=30), st.sampled_from(ODD), st.just("good " * 20000))
wild = st.one_of(
    text, st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 5),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -0.0, 1.0, 0.5]),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.sampled_from(["a", "label"]), st.integers(0, 2), max_size=2),
)
keys = st.one_of(st.sampled_from(["text", "label", "text_pair", "extra", "Text", "label ", "lábel"]), st.text(max_size=8))


@st.composite
def classification_rows(draw: Any) -> list[dict]:
    """Rows of ``text``/``label``, most of them valid, with fields dropped, added or replaced."""
    rows = [{"text": draw(st.sampled_from(WORDS)), "label": draw(st.integers(0, 1))} for _ in range(draw(st.integers(0, 4)))]
    for _ in range(draw(st.integers(1, 3))):
        if not rows:
            break
        row = rows[draw(st.integers(0, len(rows) - 1))]
        action = draw(st.sampled_from(["drop", "add", "replace"]))
        key = draw(st.sampled_from(sorted(row))) if action != "add" and row else draw(keys)
        if action == "drop":
            row.pop(key, None)
        else:
            row[key] = draw(wild)
    return rows


@st.composite
def choice_rows(draw: Any) -> list[Any]:
    """Multiple-choice rows ``{question, choices, label}`` with one field broken, or not a row at all."""
    rows: list[Any] = []
    for _ in range(draw(st.integers(0, 3))):
        choices = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))
        rows.append({"question": draw(st.sampled_from(WORDS)), "choices": choices,
                     "label": draw(st.integers(0, len(choices) - 1))})
    if rows and draw(st.booleans()):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        key = draw(st.sampled_from(["question", "choices", "label", "prompt", "extra"]))
        if draw(st.booleans()):
            row.pop(key, None)
        else:
            row[key] = draw(st.one_of(wild, st.lists(wild, max_size=3)))
    if draw(st.integers(0, 9)) == 0:
        rows.append(draw(wild))
    return rows


def file_text(rows: list[dict], kind: str, mangle: int) -> str:
    """``rows`` written as a JSON, JSONL or CSV file; ``mangle`` > 0 garbles it (truncated, a stray byte)."""
    if kind == "json":
        body = json.dumps(rows, allow_nan=True)
    elif kind == "jsonl":
        body = "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows)
    else:
        out = io.StringIO()
        columns = sorted({k for r in rows for k in r}, key=str)
        writer = csv.DictWriter(out, fieldnames=columns)
        if columns:
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        body = out.getvalue()
    if mangle == 1:
        body = body[: len(body) // 2]
    elif mangle == 2:
        body = body[:3] + '"' + body[3:]
    elif mangle == 3:
        body = ""
    return body


# --- what an error must be --------------------------------------------------------------------------


def check_error(error: BaseException, names: list[str]) -> Optional[str]:
    """``None`` if ``error`` is one of ours naming one of ``names``; else what is wrong with it."""
    if not isinstance(error, OUR_ERRORS):
        return f"{type(error).__name__} is not one of our errors: {error}"
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or not os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR):
        where = frames[-1].filename if frames else "?"
        return f"raised by {where}, not by pyro_monteclora: {type(error).__name__}: {error}"
    message = str(error)
    if not any(n and n in message for n in names):
        return f"the message names none of {names[:6]}: {message[:200]}"
    return None


def _valid_classification(rows: list[dict]) -> bool:
    """What the classification rows must be to be accepted (other columns are free)."""
    pairs = ["text_pair" in r for r in rows]
    return bool(rows) and all(
        isinstance(r.get("text"), str) and type(r.get("label")) is int and 0 <= r["label"] < 2
        and isinstance(r.get("text_pair", ""), str) for r in rows
    ) and (all(pairs) or not any(pairs))


# --- the targets ------------------------------------------------------------------------------------


def _tokenizer() -> Any:
    from pyro_monteclora.testing import toy_tokenizer

    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = toy_tokenizer(WORDS)
    return _TOKENIZER


_TOKENIZER = None


def target_rows(rows: list[dict]) -> Optional[str]:
    from pyro_monteclora.data.files import load_data
    from pyro_monteclora.data.tokenize import tokenize_classification

    try:
        tokenize_classification(load_data(rows), _tokenizer(), 16, 2)
    except Exception as error:  # noqa: BLE001 - judged below
        return check_error(error, ["row", "column", "label", "text", "empty"])
    if not _valid_classification(rows):
        return f"accepted bad rows: {rows!r:.200}"
    return None


def target_files(rows: list[dict], kind: str, mangle: int) -> Optional[str]:
    from pyro_monteclora.data.files import load_data
    from pyro_monteclora.data.tokenize import tokenize_classification

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"data.{kind}")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as handle:
            handle.write(file_text(rows, kind, mangle))
        before = sorted(os.listdir(folder))
        try:
            tokenize_classification(load_data(path), _tokenizer(), 16, 2)
            problem = None
        except Exception as error:  # noqa: BLE001
            problem = check_error(error, [path, "row", "line", "column", "label", "empty"])
        if sorted(os.listdir(folder)) != before:
            return "something was written beside the data file"
    return problem


def target_choices(rows: list[Any]) -> Optional[str]:
    from pyro_monteclora.data.choices import load_choice_rows

    try:
        checked = load_choice_rows(rows)
    except Exception as error:  # noqa: BLE001
        return check_error(error, ["row", "question", "choices", "label", "choice", "prompt", "multiple-choice"])
    for row in checked:
        if not (isinstance(row["question"], str) and row["choices"] and type(row["label"]) is int
                and 0 <= row["label"] < len(row["choices"])):
            return f"accepted a bad row: {row!r:.200}"
    return None


CONFIG_FIELDS = [
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "num_components", "sample_scaler",
    "kl_weight", "dirichlet_concentration", "wishart_df", "cooperative_weight", "variant", "prior_std",
    "column_prior", "task", "learning_rate", "guide_learning_rate", "num_epochs", "batch_size",
    "gradient_accumulation_steps", "gradient_checkpointing", "mixed_precision", "weight_decay", "lr_scheduler",
    "warmup_ratio", "max_grad_norm", "max_length", "seed", "eval_every_epoch", "log_every", "save_steps",
    "save_total_limit", "quantization", "output_dir", "merge_adapter",
]


def target_config(name: str, value: Any) -> Optional[str]:
    from pyro_monteclora import MonteCLoRAConfig

    try:
        MonteCLoRAConfig(**{name: value})
    except Exception as error:  # noqa: BLE001
        return check_error(error, [name])
    return None


FLAGS = ["--lora-r", "--lora-alpha", "--lora-dropout", "--lr", "--epochs", "--batch-size", "--seed", "--max-length",
         "--sample-scaler", "--num-components", "--warmup-ratio", "--save-steps", "--kl-weight", "--task",
         "--quantization", "--target-modules", "--no-such-flag"]
flag_values = st.one_of(st.sampled_from(["0", "-1", "abc", "nan", "inf", "1e999", "", "1.5", "3", "true", "none"]),
                        st.text(max_size=12))


def target_cli(flags: list[tuple[str, str]], folder: str) -> Optional[str]:
    from pyro_monteclora.cli import main

    out = os.path.join(folder, "out")
    model = os.path.join(folder, "no-such-model")
    argv = ["train", "--model", model, "--data", os.path.join(folder, "good.jsonl"), "--output-dir", out]
    for flag, value in flags:
        argv += [f"{flag}={value}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse: usage and one message line
            code = stop.code
    message = err.getvalue()
    if os.path.exists(out):
        return f"{argv}: something was written"
    if code == 0:
        return f"{argv}: exit code 0 with a missing model"
    if "Traceback" in message:
        return f"{argv}: a traceback: {message[-300:]}"
    names = [model, *(f for f, _ in flags), *(_dest(f) for f, _ in flags), *(v for _, v in flags if v)]
    if not any(n in message for n in names):
        return f"{argv}: the message names no flag or value: {message[-200:]}"
    return None


def _dest(flag: str) -> str:
    """The config field a ``train`` flag sets (``--lr`` -> ``learning_rate``)."""
    from pyro_monteclora.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]  # noqa: SLF001
    return next((a.dest for a in train._actions if flag in a.option_strings), flag[2:].replace("-", "_"))  # noqa: SLF001


TARGETS: dict[str, Callable[[int, int], int]] = {}


def _run(strategy: Any, check: Callable[..., Optional[str]], examples: int, seed: int) -> int:
    count = [0]

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(args: tuple) -> None:
        count[0] += 1
        problem = check(*args)
        assert problem is None, problem

    run()
    return count[0]


def fuzz_rows(examples: int, seed: int = 0) -> int:
    return _run(st.tuples(classification_rows()), target_rows, examples, seed)


def fuzz_files(examples: int, seed: int = 0) -> int:
    strategy = st.tuples(classification_rows(), st.sampled_from(["json", "jsonl", "csv"]), st.integers(0, 3))
    return _run(strategy, target_files, examples, seed)


def fuzz_choices(examples: int, seed: int = 0) -> int:
    return _run(st.tuples(choice_rows()), target_choices, examples, seed)


def fuzz_config(examples: int, seed: int = 0) -> int:
    return _run(st.tuples(st.sampled_from(CONFIG_FIELDS), wild), target_config, examples, seed)


def fuzz_cli(examples: int, seed: int = 0) -> int:
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "good.jsonl"), "w") as handle:
            handle.write('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
        strategy = st.tuples(st.lists(st.tuples(st.sampled_from(FLAGS), flag_values), min_size=1, max_size=3),
                             st.just(folder))
        return _run(strategy, target_cli, examples, seed)


TARGETS.update(rows=fuzz_rows, files=fuzz_files, choices=fuzz_choices, config=fuzz_config, cli=fuzz_cli)


def run_all(examples: int, seed: int = 0) -> dict[str, int]:
    """Run every target with ``examples`` cases; returns the cases each ran."""
    return {name: fuzz(examples, seed) for name, fuzz in TARGETS.items()}

