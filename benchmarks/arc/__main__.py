"""``python -m benchmarks.arc``: run (and save) jobs of the ARC-Easy protocol, or summarize them.

    python -m benchmarks.arc --seeds 0 --jobs lora ours           # the jobs, one at a time, saved as they finish
    python -m benchmarks.arc --lrs 1e-4 2e-4 1e-3 --jobs lora ours --seeds 0 1   # the learning-rate study
    python -m benchmarks.arc --lrs 3e-3 --jobs lora ours --seeds 0             # a rate past its span
    python -m benchmarks.arc --summarize                          # benchmarks/results/arc.md, .json, .png
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .data import PROTOCOL
from .jobs import JOBS, job_path, run_job


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--lrs", type=float, nargs="+", default=[PROTOCOL.lr], help="learning rates (the LR study)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summarize", action="store_true", help="write the report from the saved jobs only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.summarize:
        for lr in args.lrs:
            for seed in args.seeds:
                for job in args.jobs:
                    start = time.perf_counter()
                    done = job_path(job, seed, lr)
                    run_job(job, seed, lr)
                    print(f"{job} seed {seed} lr {lr:g}: {time.perf_counter() - start:.0f} s -> {done}", flush=True)
    from .report import write_report

    command = "python -m benchmarks.arc " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_report(command.strip()))


main()
