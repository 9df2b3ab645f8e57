"""``pyro-monteclora``: train, evaluate, predict with, merge, convert and inspect MonteCLoRA adapters.

Flags are spelled as in common fine-tuning tools (``--model``, ``--data``, ``--lora-r``,
``--lr``, ``--epochs``, ...). The training flags, their defaults and their help come from the
fields of :class:`~pyro_monteclora.MonteCLoRAConfig` (the one home of defaults); the defaults
of ``evaluate``/``predict``/``inspect`` come from the signatures of the functions they call.
Errors are one line on stderr and a non-zero exit code (set ``PYRO_MONTECLORA_DEBUG=1`` for the
traceback).

Example:
    $ pyro-monteclora train --data train.jsonl --output-dir out --lora-r 8 --epochs 2
    $ pyro-monteclora evaluate --adapter-path out --data test.jsonl
    $ pyro-monteclora merge --base-model-path base --adapter-path out/adapter --output-folder merged
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import tempfile
import typing
import warnings
from typing import Any, Callable, Optional, Sequence

from .config import QUANTIZATIONS, SCHEDULERS, TASKS, MonteCLoRAConfig

__all__ = ["main", "build_parser"]

#: Config fields whose flag differs from ``--field-name`` (names of common fine-tuning tools).
FLAG_NAMES = {
    "num_epochs": ("--epochs", "--num-epochs"),
    "learning_rate": ("--lr", "--learning-rate"),
}
CHOICES = {"task": TASKS, "lr_scheduler": SCHEDULERS, "quantization": tuple(q for q in QUANTIZATIONS if q) + ("none",)}
#: Fields the CLI sets itself rather than through a flag.
NOT_FLAGS = ("output_dir",)

_SECRETS: list[str] = []


# --- argument parsing ----------------------------------------------------------------------------


def _none_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _flags(name: str) -> tuple[str, ...]:
    return FLAG_NAMES.get(name, ("--" + name.replace("_", "-"),))


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(MonteCLoRAConfig)
    lora = parser.add_argument_group("LoRA")
    monte = parser.add_argument_group("MonteCLoRA")
    training = parser.add_argument_group("training")
    section = lora
    for f in dataclasses.fields(MonteCLoRAConfig):
        if f.name in NOT_FLAGS:
            continue
        if f.name == "num_components":
            section = monte
        elif f.name == "learning_rate":
            section = training
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        inner = [a for a in args if a is not type(None)]
        help_text = f.metadata.get("help", "")
        if "default" not in help_text:
            help_text += f" (default: {f.default if isinstance(f.default, bool) or f.default is None else json.dumps(f.default)})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif any(typing.get_origin(a) is list for a in inner):
            kwargs.update(nargs="+", metavar="NAME")
        else:
            kind = (inner[0] if inner else hint) if (optional or inner) else hint
            kwargs["type"] = _none_or(kind) if optional else kind
            if f.name in CHOICES:
                kwargs["choices"] = CHOICES[f.name] if optional else tuple(c for c in CHOICES[f.name] if c != "none")
                kwargs["type"] = str
        section.add_argument(*_flags(f.name), **kwargs)


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {}
    for f in dataclasses.fields(MonteCLoRAConfig):
        if f.name in NOT_FLAGS or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.name == "quantization" and value == "none":
            value = None
        if f.name == "target_modules" and isinstance(value, list) and len(value) == 1:
            value = value[0]
        if f.name == "lora_alpha" and float(value).is_integer():
            value = int(value)
        values[f.name] = value
    return values


def _add_sampling_flags(parser: argparse.ArgumentParser, defaults: dict, samples_help: str) -> None:
    """``--num-samples``, ``--batch-size`` and ``--seed`` with the defaults of the function they feed."""
    parser.add_argument(
        "--num-samples", type=int, default=defaults["num_samples"],
        help=f"{samples_help} (default: {defaults['num_samples']}).",
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults["batch_size"], help=f"Examples per batch (default: {defaults['batch_size']})."
    )
    parser.add_argument("--seed", type=int, default=defaults["seed"], help=f"Seed of the draws (default: {defaults['seed']}).")


def _defaults_of(function: Callable[..., Any]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _add_loaded_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter-path", required=True, help="A folder written by `pyro-monteclora train` (merged or adapter-only)."
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="Base model folder or hub id the adapter was trained on (default: the one recorded in the adapter).",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-monteclora`` argument parser with all subcommands."""
    from .evaluation import evaluate
    from .inspection import summary
    from .predictive import predict

    parser = argparse.ArgumentParser(
        prog="pyro-monteclora",
        description="MonteCLoRA: Bayesian LoRA fine-tuning of Hugging Face models, as a Pyro model and guide.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="Fine-tune a model with a MonteCLoRA adapter and save it.",
        description="Fine-tune a model with a MonteCLoRA adapter by SVI and save the result (merged by default).",
    )
    train.add_argument(
        "--model",
        default=None,
        help="Base model folder or hub id, or 'smollm2' for the packaged SmolLM2-135M-Instruct "
        "(default: the packaged offline all-MiniLM-L6-v2).",
    )
    train.add_argument(
        "--gguf-file", default=None,
        help="A GGUF file inside the --model folder to load (dequantized) instead of safetensors (default: none).",
    )
    train.add_argument(
        "--data",
        required=True,
        help="Training data: a local .json/.jsonl/.csv file, a folder (train/validation/test files or a "
        "datasets.save_to_disk folder) or a hub dataset id.",
    )
    train.add_argument("--eval-data", default=None, help="Evaluation data (default: the data's validation/test split).")
    train.add_argument("--output-dir", required=True, help="Folder to save the result in.")
    train.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder (default: refuse).")
    train.add_argument("--num-labels", type=int, default=None, help="Classes (default: from the data's labels).")
    _add_config_flags(train)

    defaults = _defaults_of(evaluate)
    evaluation = commands.add_parser(
        "evaluate",
        help="Accuracy, NLL, Brier score and ECE of the mean adapter and of the posterior predictive.",
        description="Evaluate a saved adapter: mean adapter and posterior predictive; prints JSON.",
    )
    _add_loaded_model_flags(evaluation)
    evaluation.add_argument("--data", required=True, help="Evaluation data (file, folder or hub id).")
    _add_sampling_flags(evaluation, defaults, "Adapters drawn from the posterior")
    evaluation.add_argument("--output", default=None, help="Also write the metrics to this JSON file (default: none).")

    defaults = _defaults_of(predict)
    prediction = commands.add_parser(
        "predict",
        help="Posterior predictive probabilities and uncertainty for texts.",
        description="Predict with a saved classification adapter; prints one JSON line per text.",
    )
    _add_loaded_model_flags(prediction)
    prediction.add_argument("--text", action="append", default=None, help="A text to classify (repeatable; default: none, use --data).")
    prediction.add_argument("--data", default=None, help="A file or folder with a `text` column (default: none, use --text).")
    _add_sampling_flags(prediction, defaults, "Adapters drawn from the posterior; 0 uses the mean adapter")

    merge = commands.add_parser(
        "merge",
        help="Merge an adapter's mean into its base model (plain transformers model).",
        description="Merge the mean adapter into the base model and save it (safetensors + tokenizer) or push it.",
    )
    merge.add_argument("--base-model-path", required=True, help="Base model folder or hub id.")
    merge.add_argument("--adapter-path", required=True, help="A pyro-monteclora adapter or output folder.")
    target = merge.add_mutually_exclusive_group(required=True)
    target.add_argument("--output-folder", default=None, help="Folder to save the merged model in (default: none; this or --push-to-hub is required).")
    target.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="Hub repository to upload the merged model to (default: none; this or --output-folder is required).")
    merge.add_argument(
        "--token", default=None,
        help="Hub token for --push-to-hub (default: $HF_TOKEN or the saved login). Never printed.",
    )
    merge.add_argument(
        "--pad-to-multiple-of", type=int, default=None,
        help="Resize the token embeddings to a multiple of N when the tokenizer has more tokens than the base (default: no resize).",
    )
    merge.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder (default: refuse).")

    kohya = commands.add_parser(
        "convert-kohya",
        help="Export the mean LoRA adapter as one Kohya-format safetensors file.",
        description="Export lora_down/lora_up/alpha tensors, alpha = the trained lora_alpha (scale alpha/r kept).",
    )
    kohya.add_argument("--adapter-path", required=True, help="A peft or pyro-monteclora adapter folder.")
    kohya.add_argument("--output", required=True, help="The .safetensors file to write.")
    kohya.add_argument(
        "--lora-only", action="store_true",
        help="Leave out fully trained modules such as the classifier (default: keep them under their peft keys).",
    )
    kohya.add_argument("--overwrite", action="store_true", help="Replace an existing output file (default: refuse).")

    defaults = _defaults_of(summary)
    inspection = commands.add_parser(
        "inspect",
        help="Show the Pyro model's sites and what the variational posterior learned.",
        description="Print the settings, the Pyro model and guide sites, and a per-group summary of the posterior.",
    )
    _add_loaded_model_flags(inspection)
    inspection.add_argument(
        "--num-samples", type=int, default=defaults["num_samples"],
        help=f"Guide draws for the noise-share estimate (default: {defaults['num_samples']}).",
    )
    for sub in commands.choices.values():
        sub.add_argument(
            "--verbose", action="store_true",
            help="Show the libraries' logs, warnings and progress bars (default: only what the command reports).",
        )
    return parser


# --- data and models -----------------------------------------------------------------------------


DATA_EXTENSIONS = (".jsonl", ".json", ".csv")


def load_data_arg(spec: str) -> Any:
    """A ``Dataset``/``DatasetDict`` from a file, a folder or (where the network works) a hub id."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    from .data import load_data

    if os.path.isfile(spec):
        return load_data(spec)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "dataset_dict.json")) or os.path.isfile(os.path.join(spec, "state.json")):
            return load_from_disk(spec)
        splits = {}
        for split in ("train", "validation", "test", "eval"):
            for extension in DATA_EXTENSIONS:
                path = os.path.join(spec, split + extension)
                if os.path.isfile(path):
                    splits[split] = load_data(path)
                    break
        if not splits:
            raise FileNotFoundError(
                f"no data in folder {spec!r}: expected train/validation/test .jsonl/.json/.csv files "
                "or a datasets.save_to_disk folder"
            )
        return DatasetDict(splits)
    if os.path.sep in spec or spec.endswith(DATA_EXTENSIONS):
        raise FileNotFoundError(f"data {spec!r} does not exist")
    return load_dataset(spec)


def _labels(data: Any, num_labels: Optional[int]) -> tuple[Optional[int], Optional[dict[int, str]]]:
    """The classes of the training labels: their count and names (printed once on stderr).

    String labels become classes 0..K-1 in sorted order; integer labels must be 0..K-1 (or
    fit in ``--num-labels``); anything else is an error that says what to fix.
    """
    from datasets import DatasetDict

    split = data["train"] if isinstance(data, DatasetDict) and "train" in data else data
    if isinstance(split, DatasetDict):
        split = next(iter(split.values()))
    if "label" not in split.column_names:
        return num_labels, None
    feature = split.features["label"]
    if getattr(feature, "names", None):
        names = dict(enumerate(feature.names))
    else:
        values = set(split["label"])
        if all(isinstance(v, str) for v in values):
            names = dict(enumerate(sorted(values)))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            top = max(values)
            count = num_labels if num_labels is not None else top + 1
            if min(values) < 0 or top >= count:
                raise ValueError(f"integer labels must lie in [0, {count}); the data has {sorted(values)[:10]}")
            if num_labels is None and len(values) != count:
                missing = sorted(set(range(count)) - values)
                raise ValueError(
                    f"the integer labels {sorted(values)[:10]} skip class(es) {missing[:10]}: renumber them 0..K-1, "
                    f"or pass --num-labels {count} to keep {count} classes"
                )
            names = {i: str(i) for i in range(count)}
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise ValueError(f"labels must be all integers or all strings; the 'label' column holds {', '.join(kinds)}")
    if num_labels is not None and num_labels != len(names):
        raise ValueError(f"--num-labels {num_labels} does not match the {len(names)} label names {list(names.values())}")
    if len(names) < 2:
        raise ValueError(f"the training data has a single class ({list(names.values())}): a classifier needs at least two")
    shown = ", ".join(names.values()) if len(names) <= 10 else ", ".join(list(names.values())[:10]) + ", ..."
    print(f"classification: {len(names)} classes: {shown}", file=sys.stderr)
    return len(names), names


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))


def _base_model_path(args: argparse.Namespace) -> str:
    from .io import read_metadata

    if args.base_model:
        return args.base_model
    recorded = read_metadata(args.adapter_path).get("base_model_name_or_path")
    if not recorded:
        raise ValueError("the adapter does not record its base model: pass --base-model")
    return recorded


def _is_smollm2(path: str) -> bool:
    from .examples import SMOLLM2_FILE

    return path == "smollm2" or (
        os.path.isfile(os.path.join(path, SMOLLM2_FILE)) and not os.path.isfile(os.path.join(path, "config.json"))
    )


def _load_monteclora(args: argparse.Namespace) -> Any:
    from .io import load

    path = _base_model_path(args)
    if _is_smollm2(path):
        from .examples import load_smollm2

        model, tokenizer = load_smollm2()
        return load(model, args.adapter_path, tokenizer=tokenizer)
    return load(path, args.adapter_path)


# --- subcommands ---------------------------------------------------------------------------------


def _writable_target(path: str, overwrite: bool) -> str:
    """The one rule of every writer: an existing file or non-empty folder is replaced only with
    ``--overwrite``; missing parent folders are created. Checked (with a real write) before any work."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (os.path.isfile(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or choose another path")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"cannot create {path}: a parent of it is a file, not a folder") from None
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write to {parent}: {error.strerror}") from None
    return path


def _train(args: argparse.Namespace) -> int:
    import torch

    from .config import MonteCLoRAConfig
    from .examples import minilm_path
    from .io import final_metrics, save_result
    from .quantization import load_base_model
    from .train import train

    config = MonteCLoRAConfig().replace(**_config_overrides(args))
    output_dir = _writable_target(args.output_dir, args.overwrite)  # fail before training, not after
    model_path = args.model or minilm_path()
    data = load_data_arg(args.data)
    eval_data = load_data_arg(args.eval_data) if args.eval_data else None
    task = config.task
    smollm2 = _is_smollm2(model_path) or args.gguf_file is not None
    if task == "auto":
        from .quantization import _task_of_folder

        if smollm2:
            task = "causal_lm"
        else:
            task = _task_of_folder(model_path) if os.path.isdir(model_path) else "classification"
    num_labels, id2label = (args.num_labels, None)
    if task == "classification":
        num_labels, id2label = _labels(data, args.num_labels)
    with torch.random.fork_rng():  # the seed covers everything the command creates, a new head included
        torch.manual_seed(config.seed)
        if smollm2:
            base, tokenizer = _load_gguf(model_path, args.gguf_file)
        else:
            tokenizer = _tokenizer(model_path)
            base = load_base_model(
                model_path, task, config.quantization, num_labels=num_labels, id2label=id2label,
                exclude=config.modules_to_save,
            )
    result = train(base, data, config.replace(task=task, output_dir=None), tokenizer=tokenizer, eval_dataset=eval_data,
                   verbose=args.verbose)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    result.config = result.config.replace(output_dir=output_dir)
    folder = save_result(result, output_dir, overwrite=True)  # refused above unless --overwrite
    print(json.dumps({"output_dir": folder, "merged": config.merge_adapter, "metrics": final_metrics(result),
                      "warnings": result.warnings}, sort_keys=True))
    return 0


def _load_gguf(model_path: str, gguf_file: Optional[str]) -> tuple[Any, Any]:
    from .examples import load_smollm2

    if gguf_file is None or model_path == "smollm2":
        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(model_path, gguf_file)):
        raise FileNotFoundError(f"no GGUF file {gguf_file!r} in {model_path!r}")
    tokenizer = AutoTokenizer.from_pretrained(model_path, gguf_file=gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(model_path, gguf_file=gguf_file), tokenizer


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    monteclora = _load_monteclora(args)
    metrics = evaluate(
        monteclora, load_data_arg(args.data), num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed
    )
    text = json.dumps(metrics, sort_keys=True, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    print(text)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predictive import predict

    if args.text is None and args.data is None:
        raise ValueError("nothing to predict: give texts with --text (repeatable) or a file with --data")
    if args.text is not None and args.data is not None:
        raise ValueError("give texts with --text or a file with --data, not both")
    monteclora = _load_monteclora(args)
    if args.text is not None:
        texts = list(args.text)
    else:
        data = load_data_arg(args.data)
        from datasets import DatasetDict

        if isinstance(data, DatasetDict):
            data = data["test"] if "test" in data else next(iter(data.values()))
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


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge

    if args.output_folder:
        _writable_target(args.output_folder, args.overwrite)
    token = args.token or os.environ.get("HF_TOKEN")
    if token:
        _SECRETS.append(token)
    where = merge(
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
    from .kohya import peft_to_kohya

    output = _writable_target(args.output, args.overwrite)
    print(json.dumps({"kohya": peft_to_kohya(args.adapter_path, output, include_modules_to_save=not args.lora_only)}))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import format_summary, render_model_text, summary
    from .io import read_metadata

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be a positive integer, got {args.num_samples}")
    meta = read_metadata(args.adapter_path)
    monteclora = _load_monteclora(args)
    print(f"pyro-monteclora {meta.get('pyro_monteclora_version')} adapter on {meta.get('base_model_name_or_path')}")
    print(render_model_text(monteclora))
    print()
    print(format_summary(summary(monteclora, num_samples=args.num_samples)))
    if meta.get("metrics"):
        print()
        print("final metrics: " + json.dumps(meta["metrics"], sort_keys=True))
    return 0


COMMANDS = {
    "train": _train,
    "evaluate": _evaluate,
    "predict": _predict,
    "merge": _merge,
    "convert-kohya": _convert_kohya,
    "inspect": _inspect,
}


def _scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret:
            text = text.replace(secret, "***")
    return text


def _format_warning(message: Any, category: type, filename: str, lineno: int, line: Optional[str] = None) -> str:
    return f"warning: {_scrub(str(message))}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``pyro-monteclora`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, value in enumerate(argv):  # keep a token given on the command line out of any output
        if value == "--token" and i + 1 < len(argv):
            _SECRETS.append(argv[i + 1])
        elif value.startswith("--token="):
            _SECRETS.append(value.split("=", 1)[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.formatwarning = _format_warning
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    args = build_parser().parse_args(argv)
    try:
        from .quiet import quiet

        with quiet(args.verbose):
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("pyro-monteclora: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line, not a traceback
        if os.environ.get("PYRO_MONTECLORA_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"pyro-monteclora {args.command}: error: {_scrub(message)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
