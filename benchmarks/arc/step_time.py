"""``python -m benchmarks.arc.step_time``: the training step's time of ours against LoRA, same data, same likelihood.

The protocol's jobs time a whole training run each, one job at a time, in whatever session they ran; this
measures the step alone, in one process, the methods interleaved (A B C, A B C, ...) so drifts of the machine
fall on all of them: LoRA (the protocol's AdamW loop) and ours (``pyro_monteclora.train``, paper and learned
variants), by SFT and by the multiple-choice likelihood, on the first ``--rows`` ARC-Easy training questions
of the protocol for one epoch. A method's step time is the median interval between its step ends after the
first (model loading, tokenizing and the first step are not counted). Writes
``benchmarks/results/arc_step_time.md`` and ``.json`` with the command and date.

    python -m benchmarks.arc.step_time --rows 96 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from ..calibration.methods import train_plain
from ..calibration.methods import train_ours as _train_ours
from .data import load_rows, sft_rows
from .jobs import LEARNED
from .methods import SUITE

OUT = os.path.join("benchmarks", "results")
#: name -> (trainer: "lora" or "ours", multiple-choice likelihood?, overrides of ours).
METHODS = {
    "lora": ("lora", False, {}),
    "ours": ("ours", False, {}),
    "ours_learned": ("ours", False, LEARNED),
    "lora_mc": ("lora", True, {}),
    "ours_mc": ("ours", True, {"task": "multiple_choice"}),
}


def _step_times(method: str, rows: list[dict], seed: int) -> list[float]:
    """The intervals between consecutive step ends of one short training run of ``method``."""
    trainer, choices, overrides = METHODS[method]
    suite = replace(SUITE, epochs=1)
    ends: list[float] = []

    def mark(*_: Any) -> None:
        ends.append(time.perf_counter())

    if trainer == "lora":
        train_plain(suite, rows if choices else sft_rows(rows), seed, choices=choices, on_step=mark)
    else:
        from transformers import TrainerCallback

        class Mark(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                mark()

        _train_ours(suite, rows if choices else sft_rows(rows), seed, [Mark()], **overrides)
    return [b - a for a, b in zip(ends, ends[1:])]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96, help="training questions (batch 8: rows / 8 steps)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = load_rows()["train"][: args.rows]
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for repeat in range(args.repeats):
        for method in args.methods:
            times[method] += _step_times(method, rows, seed=repeat)
            print(f"{method} repeat {repeat}: median step {statistics.median(times[method]):.3f} s", flush=True)
    median = {m: statistics.median(t) for m, t in times.items()}
    command = "python -m benchmarks.arc.step_time " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Training step time, ours against LoRA (ARC-Easy, SmolLM2-135M-Instruct)", "",
             f"`{command.strip()}`, {datetime.date.today().isoformat()}, {args.threads} threads, batch "
             f"{SUITE.batch_size}, max length {SUITE.max_length}; {args.repeats} interleaved repeats of one epoch of "
             f"{args.rows} questions per method; median interval between step ends after the first.", "",
             "| method | steps timed | median step (s) | / LoRA by the same likelihood |", "|---|---|---|---|"]
    for method, steps in times.items():
        lora = "lora_mc" if METHODS[method][1] else "lora"
        ratio = f"{median[method] / median[lora]:.2f}" if lora in median else "—"
        lines.append(f"| {method} | {len(steps)} | {median[method]:.3f} | {ratio} |")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "arc_step_time.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    result = {"command": command.strip(), "date": datetime.date.today().isoformat(), "step_seconds": times,
              "median": median}
    with open(os.path.join(OUT, "arc_step_time.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
