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

The work is split by job: :mod:`~pyro_monteclora.cli.parser` (the subcommands and flags),
:mod:`~pyro_monteclora.cli.inputs` (data, labels, models, output paths) and
:mod:`~pyro_monteclora.cli.commands` (what each subcommand does); this module is the entry
point that turns an error into one line.

    >>> from pyro_monteclora.cli import build_parser
    >>> build_parser().parse_args(["inspect", "--adapter-path", "out"]).num_samples > 0
    True
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Optional, Sequence

from ..quiet import quiet
from .commands import COMMANDS, SECRETS
from .parser import build_parser

__all__ = ["main"]


def _scrub(text: str) -> str:
    """``text`` with every known Hub token replaced by ``***``."""
    for secret in SECRETS:
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
            SECRETS.append(argv[i + 1])
        elif value.startswith("--token="):
            SECRETS.append(value.split("=", 1)[1])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    formatwarning = warnings.formatwarning
    try:  # warnings as one line each, for this call only: the caller's filters and format come back
        with warnings.catch_warnings():
            warnings.formatwarning = _format_warning
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return _run(build_parser().parse_args(argv))
    finally:
        warnings.formatwarning = formatwarning


def _run(args: Any) -> int:
    """Run the subcommand of ``args``; an error becomes one line on stderr and exit code 1."""
    try:
        with quiet(getattr(args, "verbose", True)):
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
