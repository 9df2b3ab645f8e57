"""The ``pyro-monteclora`` argument parser: the subcommands, their flags and their defaults.

The training flags, their defaults and their help come from the fields of
:class:`~pyro_monteclora.MonteCLoRAConfig` (the one home of defaults), spelled as in common
fine-tuning tools (``--lr``, ``--epochs``); the defaults of ``evaluate``/``predict``/``inspect``
come from the signatures of the functions they call.

Example:
    >>> from pyro_monteclora import MonteCLoRAConfig
    >>> from pyro_monteclora.cli.parser import build_parser, config_overrides
    >>> args = build_parser().parse_args(["train", "--data", "d.jsonl", "--output-dir", "o", "--lr", "0.01"])
    >>> MonteCLoRAConfig().replace(**config_overrides(args)).learning_rate
    0.01
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import typing
from typing import Any, Callable

from ..config import CHOICE_SCORES, QUANTIZATIONS, SCHEDULERS, TASKS, MonteCLoRAConfig

__all__ = ["build_parser", "config_overrides", "FLAG_NAMES", "CHOICES", "NOT_FLAGS"]

#: Config fields whose flag differs from ``--field-name`` (names of common fine-tuning tools).
FLAG_NAMES = {
    "num_epochs": ("--epochs", "--num-epochs"),
    "learning_rate": ("--lr", "--learning-rate"),
}
CHOICES = {"task": TASKS, "choice_score": CHOICE_SCORES, "lr_scheduler": SCHEDULERS,
           "quantization": tuple(q for q in QUANTIZATIONS if q) + ("none",)}
#: Fields the CLI sets itself rather than through a flag.
NOT_FLAGS = ("output_dir",)


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


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set on the command line, as values of :class:`MonteCLoRAConfig`."""
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
    from ..prediction.evaluation import evaluate
    from ..inspection import summary
    from ..prediction.predictive import predict

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
    evaluation.add_argument("--overwrite", action="store_true", help="Replace an existing --output file (default: refuse).")

    defaults = _defaults_of(predict)
    prediction = commands.add_parser(
        "predict",
        help="Posterior predictive probabilities and uncertainty for texts (or prompts and candidate answers).",
        description="Predict with a saved adapter; prints one JSON line per text. A classifier reads texts; a "
        "causal LM scores candidate answers: instruction rows ending in 'Answer format: a/b/...' (--data), or "
        "prompts (--text) with --candidate completions.",
    )
    _add_loaded_model_flags(prediction)
    prediction.add_argument("--text", action="append", default=None,
                            help="A text to classify, or a prompt for a causal LM (repeatable; default: none, use --data).")
    prediction.add_argument("--data", default=None,
                            help="A file or folder with a `text` column, or instruction rows for a causal LM (default: none, use --text).")
    prediction.add_argument("--candidate", action="append", default=None,
                            help="Causal LM with --text: a candidate completion (repeatable, at least 2; default: none).")
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
    harness = commands.add_parser(
        "lm-eval", add_help=False, prefix_chars="\0",
        help="Run lm-evaluation-harness with pyro_monteclora's model registered (--model monteclora).",
        description="lm-eval's own command line, with --model monteclora known to it. Every argument goes to "
                    "lm-eval (see `pyro-monteclora lm-eval --help`).",
    )
    harness.add_argument("harness_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    for name, sub in commands.choices.items():
        if name == "lm-eval":
            continue  # its arguments, --verbose included, are lm-eval's
        sub.add_argument(
            "--verbose", action="store_true",
            help="Show the libraries' logs, warnings and progress bars (default: only what the command reports).",
        )
    return parser

