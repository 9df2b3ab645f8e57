"""The ``pyro-monteclora`` subcommands: train, evaluate, predict, merge, convert-kohya, inspect and lm-eval.

A command that writes holds its target's one-writer lock (:func:`pyro_monteclora.io.lock.hold_output`)
from before any work to the end, so a second writer of the same target is refused at once.
Each takes the parsed arguments (:func:`pyro_monteclora.cli.parser.build_parser`), prints its
result (JSON for all but ``inspect``) on stdout and returns the exit code; errors are raised and
turned into one line on stderr by :func:`pyro_monteclora.cli.main`.

Example:
    >>> from pyro_monteclora.cli.commands import COMMANDS
    >>> sorted(COMMANDS)
    ['convert-kohya', 'evaluate', 'inspect', 'lm-eval', 'merge', 'predict', 'train']
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any

from .inputs import class_labels, is_smollm2, load_data_arg, load_gguf, load_monteclora, load_tokenizer, writable_target
from .parser import config_overrides
from ..io.atomic import atomic_write_file
from ..io.lock import hold_output
from ..io.read import check_model_path

__all__ = ["COMMANDS", "SECRETS"]

#: Hub tokens seen by this process, kept out of every message (:func:`pyro_monteclora.cli.main`).
SECRETS: list[str] = []


def _train(args: argparse.Namespace) -> int:
    from ..config import MonteCLoRAConfig

    config = MonteCLoRAConfig().replace(**config_overrides(args))
    output_dir = writable_target(args.output_dir, args.overwrite)  # fail before training, not after
    with hold_output(output_dir):  # one writer per output, from before any work to the end
        return _train_into(args, config, output_dir)


def _choice_rows(data: Any) -> bool:
    """Whether loaded data (a ``Dataset`` or the first split of a ``DatasetDict``) are multiple-choice rows."""
    from ..data.choices import is_choice_data

    columns = getattr(data, "column_names", [])
    if isinstance(columns, dict):
        columns = next(iter(columns.values()), [])
    return is_choice_data(columns)


def _train_into(args: argparse.Namespace, config: Any, output_dir: str) -> int:
    import torch

    from ..examples import minilm_path
    from ..io import final_metrics, save_result
    from ..quantization import load_base_model
    from ..train import train

    model_path = args.model or minilm_path()
    check_model_path(model_path, "model")
    data = load_data_arg(args.data)
    eval_data = load_data_arg(args.eval_data) if args.eval_data else None
    task = config.task
    smollm2 = is_smollm2(model_path) or args.gguf_file is not None
    if task == "auto":
        from ..quantization import task_of_folder

        if smollm2:
            task = "causal_lm"
        else:
            task = task_of_folder(model_path) if os.path.isdir(model_path) else "classification"
    num_labels, id2label = (args.num_labels, None)
    if task == "classification":
        num_labels, id2label = class_labels(data, args.num_labels, source=args.data)
    with torch.random.fork_rng():  # the seed covers everything the command creates, a new head included
        torch.manual_seed(config.seed)
        if smollm2:
            base, tokenizer = load_gguf(model_path, args.gguf_file)
        else:
            tokenizer = load_tokenizer(model_path)
            base = load_base_model(
                model_path, task, config.quantization, num_labels=num_labels, id2label=id2label,
                exclude=config.modules_to_save,
            )
    if config.task == "auto" and task == "causal_lm" and _choice_rows(data):
        task = "multiple_choice"  # as train() decides under "auto": choice rows train by their likelihood
    result = train(base, data, config.replace(task=task, output_dir=None), tokenizer=tokenizer, eval_dataset=eval_data,
                   verbose=args.verbose)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    result.config = result.config.replace(output_dir=output_dir)
    folder = save_result(result, output_dir, overwrite=True)  # refused above unless --overwrite
    print(json.dumps({"output_dir": folder, "merged": config.merge_adapter, "metrics": final_metrics(result),
                      "warnings": result.warnings}, sort_keys=True))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..prediction.evaluation import evaluate

    output = writable_target(args.output, args.overwrite, "file") if args.output else None  # before the work
    with hold_output(output) if output else contextlib.nullcontext():
        monteclora = load_monteclora(args)
        metrics = evaluate(
            monteclora, load_data_arg(args.data), num_samples=args.num_samples, batch_size=args.batch_size,
            seed=args.seed,
        )
        text = json.dumps(metrics, sort_keys=True, indent=2)
        if output:
            atomic_write_file(output, (text + "\n").encode("utf-8"))
    print(text)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ..prediction.predictive import predict

    if args.text is None and args.data is None:
        raise ValueError("nothing to predict: give texts with --text (repeatable) or a file with --data")
    if args.text is not None and args.data is not None:
        raise ValueError("give texts with --text or a file with --data, not both")
    monteclora = load_monteclora(args)
    if monteclora.task == "causal_lm":
        return _predict_choices(args, monteclora)
    if args.candidate is not None:
        raise ValueError("--candidate is for causal LMs; this adapter is a classifier, which predicts its classes")
    if args.text is not None:
        texts = list(args.text)
    else:
        data = _first_split(load_data_arg(args.data))
        if "text" not in data.column_names:
            raise ValueError(f"{args.data} has no 'text' column (its columns: {data.column_names}); predict reads 'text'")
        texts = list(data["text"])
    outputs = predict(monteclora, texts, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed)
    id2label = getattr(monteclora.network.config, "id2label", {}) or {}
    for i, text in enumerate(texts):
        probs = outputs["probs"][i]
        label = int(probs.argmax())
        row = {
            "text": text,
            "label": id2label.get(label, label),
            "probs": [round(float(p), 6) for p in probs],
            **{k: round(float(outputs[k][i]), 6) for k in ("entropy", "expected_entropy", "mutual_information") if k in outputs},
        }
        print(json.dumps(row))
    return 0


def _first_split(data: Any) -> Any:
    from datasets import DatasetDict

    if isinstance(data, DatasetDict):
        return data["test"] if "test" in data else next(iter(data.values()))
    return data


def _predict_choices(args: argparse.Namespace, monteclora: Any) -> int:
    """A causal LM: the posterior predictive over candidate answers, one JSON line per prompt."""
    from ..prediction.scoring import candidate_completions, multiple_choice

    if args.text is not None:
        if not args.candidate or len(args.candidate) < 2:
            raise ValueError("a causal LM scores candidate answers: give at least two --candidate completions with --text")
        prompts, candidates = list(args.text), [list(args.candidate)] * len(args.text)
    else:
        if args.candidate is not None:
            raise ValueError("--candidate goes with --text; rows of --data carry their answers in 'Answer format: a/b/...'")
        rows = list(_first_split(load_data_arg(args.data)))
        if not rows or "instruction" not in rows[0]:
            raise ValueError(f"{args.data}: a causal LM predicts from instruction rows (instruction, input) ending in "
                             "'Answer format: a/b/...'")
        prompts, candidates = rows, [candidate_completions(row) for row in rows]
    outputs = multiple_choice(monteclora, prompts, candidates, num_samples=args.num_samples, seed=args.seed,
                              batch_size=args.batch_size)
    for i, prompt in enumerate(prompts):
        probs = outputs["probs"][i]
        print(json.dumps({
            "prompt": prompt if isinstance(prompt, str) else prompt["instruction"],
            "prediction": candidates[i][int(probs.argmax())],
            "candidates": candidates[i],
            "probs": [round(float(p), 6) for p in probs],
            **{k: round(float(outputs[k][i]), 6) for k in ("entropy", "expected_entropy", "mutual_information")},
        }))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..export.merge import merge

    if args.output_folder:
        writable_target(args.output_folder, args.overwrite)
    token = args.token or os.environ.get("HF_TOKEN")
    if token:
        SECRETS.append(token)
    where = merge(  # holds the output folder's lock from its start
        args.base_model_path,
        args.adapter_path,
        args.output_folder,
        args.push_to_hub,
        token=token,
        pad_to_multiple_of=args.pad_to_multiple_of,
        overwrite=args.overwrite,
    )
    print(json.dumps({"merged": where}))
    return 0


def _convert_kohya(args: argparse.Namespace) -> int:
    from ..export.kohya import peft_to_kohya

    output = writable_target(args.output, args.overwrite, "file")
    written = peft_to_kohya(  # holds the output file's lock from its start
        args.adapter_path, output, include_modules_to_save=not args.lora_only, overwrite=args.overwrite
    )
    print(json.dumps({"kohya": written}))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..inspection import format_summary, render_model_text, summary
    from ..io import read_metadata

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be a positive integer, got {args.num_samples}")
    meta = read_metadata(args.adapter_path)
    monteclora = load_monteclora(args)
    print(f"pyro-monteclora {meta.get('pyro_monteclora_version')} adapter on {meta.get('base_model_name_or_path')}")
    print(render_model_text(monteclora))
    print()
    print(format_summary(summary(monteclora, num_samples=args.num_samples)))
    if meta.get("metrics"):
        print()
        print("final metrics: " + json.dumps(meta["metrics"], sort_keys=True))
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    """lm-eval's own command line (``lm_eval run ...``) in this process, with ``monteclora`` registered."""
    try:
        from ..prediction import harness  # noqa: F401  (registers --model monteclora)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise ImportError(f"{error}; the lm-eval command needs: pip install 'pyro-monteclora[eval]'") from None
    argv = sys.argv
    sys.argv = ["lm-eval", *args.harness_args]  # lm-eval's entry point reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as stop:  # lm-eval's argparse: --help, or bad arguments (it printed why)
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = argv
    return 0


COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "predict": _predict,
    "merge": _merge,
    "convert-kohya": _convert_kohya,
    "inspect": _inspect,
    "lm-eval": _lm_eval,
}

