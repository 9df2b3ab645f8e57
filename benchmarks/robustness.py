"""Robustness of MiniLM fine-tunes to learning rate and batch size: pyro_monteclora vs the alternatives.

Every (task, learning rate, batch size, seed) is trained once per method with the same data,
order, budget and evaluation (see ``common.py``): plain peft LoRA (``lora``), peft's MonteCLoRA
variant (``peft_mc``), and pyro_monteclora evaluated with its mean adapter (``ours_mean``) and its
posterior predictive of S draws (``ours_pp``; S = 8 on VADER and BoolQ, 4 on ARC and with ``--quick``). Per task and method
the table gives the best, worst, spread and mean +- std of test accuracy over the sweep, and
NLL / ECE (15 bins) / Brier at the method's best setting and averaged over the sweep. On VADER
it adds the Spearman correlation of predictive entropy with the raters' standard deviation.

Usage::

    python -m benchmarks.robustness --quick      # 3 lrs, 1 batch size, VADER + BoolQ subsets (< 10 min)
    python -m benchmarks.robustness              # 5 lrs x 2 batch sizes x 3 tasks (< 90 min on 2 cores)

Writes ``robustness[_quick].md``, ``robustness[_quick].png`` and ``robustness[_quick].json``
(raw per-run metrics) under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch

from . import common

EVALS = ("lora", "peft_mc", "ours_mean", "ours_pp")
# accuracies are ratios of counts: 72/200 - 62/200 is 0.0499999... in floating point, not 0.05
TOL = 1e-9
# Budget per task: plain LoRA at lr 1e-3 beats the majority class by > 5 points at budgets of
# this size (measured: BoolQ 3000 balanced questions x 3 epochs -> 58.7% vs 50%; ARC-Easy 800
# questions x 3 epochs -> 37.5% vs 32.0%), and the 90 runs fit in < 90 min on 2 worker processes
# (measured: 71 min).
# ARC is the costly task: a 32 x 32-token step takes ~1.8 s on one of two busy cores (VADER's
# words ~0.25 s), and the posterior predictive scores each test pair once per draw, so ARC gets
# 500 training questions x 2 epochs, 200 test questions and S = 4 draws.
FULL = dict(
    lrs=[1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2],
    batch_sizes=[32, 64],
    sizes={"vader": (2000, 1000), "boolq": (2000, 600), "arc": (1000, 200)},
    epochs={"vader": 3, "boolq": 3, "arc": 2},
    num_draws={"vader": 8, "boolq": 8, "arc": 4},
)
# --quick: < 10 min. VADER and BoolQ only by default (`--tasks vader boolq arc` adds ARC), 3 lrs,
# one batch size, small sets and S = 4: a smoke test of the sweep, too small to compare methods.
QUICK = dict(
    lrs=[1e-4, 1e-3, 1e-2],
    batch_sizes=[32],
    sizes={"vader": (1000, 300), "boolq": (600, 200), "arc": (320, 60)},
    epochs={"vader": 2, "boolq": 2, "arc": 2},
    num_draws={"vader": 4, "boolq": 4, "arc": 4},
)
QUICK_TASKS = ["vader", "boolq"]


_TASKS: dict = {}


def _task(name: str, train_size: int, test_size: int) -> common.Task:
    key = (name, train_size, test_size)
    if key not in _TASKS:  # one load per process: a worker runs many jobs of the same task
        _TASKS[key] = common.load_task(name, train_size, test_size, seed=0)
    return _TASKS[key]


def run_job(job: dict) -> list[dict]:
    """Train one method on one (task, lr, batch size, seed) and evaluate it: a record per
    evaluation (``ours`` gives ``ours_mean`` and ``ours_pp``). Runs in a worker process."""
    torch.set_num_threads(job["threads"])
    task = _task(job["task"], *job["sizes"])
    result = common.run_method(job["method"], task, job["lr"], job["batch_size"], job["epochs"], job["seed"],
                               num_draws=job["num_draws"])
    records = []
    for name, probs in result.probs.items():
        metrics = common.calibration(probs, task.eval_labels)
        record = dict(task=job["task"], method=name, lr=job["lr"], batch_size=job["batch_size"], seed=job["seed"],
                      seconds=result.seconds, majority=task.majority, **metrics)
        if task.rating_std is not None:
            record["entropy_spearman"] = common.spearman(common.entropy(probs), task.rating_std)
            if "mutual_information" in result.extra and name == "ours_pp":
                record["mi_spearman"] = common.spearman(result.extra["mutual_information"], task.rating_std)
                record["mean_mi"] = float(np.mean(result.extra["mutual_information"]))
        records.append(record)
    return records


def _order(record: dict) -> tuple:
    return (record["task"], record["seed"], record["batch_size"], record["lr"], EVALS.index(record["method"]))


def run_sweep(settings: dict, tasks: list[str], seeds: list[int], log, save=lambda records: None,
              workers: int = 1, threads: int = 1) -> list[dict]:
    """Every (task, seed, batch size, lr, method) job, on ``workers`` processes of ``threads``
    torch threads each (jobs are independent: each seeds its own data order and initialization,
    so the results do not depend on the number of workers)."""
    jobs = []
    for task_name in tasks:
        sizes = settings["sizes"][task_name]
        task = _task(task_name, *sizes)
        log(f"{task_name}: {len(task.train)} train rows, {len(task.eval_labels)} test items, "
            f"majority baseline {100 * task.majority:.1f}%")
        jobs += [dict(task=task_name, sizes=sizes, epochs=settings["epochs"][task_name], lr=lr, batch_size=batch_size,
                      seed=seed, method=method, num_draws=settings["num_draws"][task_name], threads=threads)
                 for seed in seeds for batch_size in settings["batch_sizes"] for lr in settings["lrs"]
                 for method in common.METHODS]
    records: list[dict] = []

    def collect(new: list[dict]) -> None:
        records.extend(new)
        records.sort(key=_order)
        save(records)
        for r in new:
            log(f"  {r['task']} lr={r['lr']:g} bs={r['batch_size']} seed={r['seed']} {r['method']:9s} "
                f"acc={r['accuracy']:.3f} nll={r['nll']:.3f} ece={r['ece']:.3f} ({r['seconds']:.0f}s)")

    if workers == 1:
        torch.set_num_threads(threads)
        for job in jobs:
            collect(run_job(job))
    else:
        import multiprocessing

        # the costliest task first, so that the last jobs to finish are short ones
        cost = {task_name: i for i, task_name in enumerate(["arc", "boolq", "vader"])}
        jobs.sort(key=lambda j: cost.get(j["task"], -1))
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for new in pool.imap_unordered(run_job, jobs):
                collect(new)
    return records


def _setting(r: dict) -> tuple:
    return (r["lr"], r["batch_size"])


def summarize(records: list[dict], tasks: list[str]) -> tuple[list[str], dict]:
    """Markdown rows and the per-(task, method) summary used for the target checks."""
    summary: dict = {}
    lines = [
        "| task | method | best acc | worst acc | spread | mean ± std acc | NLL best / avg | ECE best / avg "
        "| Brier best / avg | entropy~rating-std ρ best / avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        for method in EVALS:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            # average seeds per setting, then sweep statistics over settings
            settings = sorted({_setting(r) for r in mine})
            per = {s: {k: float(np.mean([r[k] for r in mine if _setting(r) == s]))
                       for k in ("accuracy", "nll", "ece", "brier", "entropy_spearman") if k in mine[0]}
                   for s in settings}
            acc = np.array([per[s]["accuracy"] for s in settings])
            best = settings[int(acc.argmax())]
            s = dict(best=acc.max(), worst=acc.min(), spread=acc.max() - acc.min(), mean=acc.mean(), std=acc.std(),
                     best_setting=best, per=per, majority=rows[0]["majority"])
            for k in ("nll", "ece", "brier", "entropy_spearman"):
                if k in per[best]:
                    s[k + "_best"] = per[best][k]
                    # nanmean: rho is undefined (nan) where a run collapsed to constant predictions
                    s[k + "_avg"] = float(np.nanmean([per[x][k] for x in settings]))
            summary[(task, method)] = s
            rho = (f"{s['entropy_spearman_best']:.3f} / {s['entropy_spearman_avg']:.3f}"
                   if "entropy_spearman_best" in s else "–")
            lines.append(
                f"| {task} | {method} | {100 * s['best']:.1f} | {100 * s['worst']:.1f} | {100 * s['spread']:.1f} "
                f"| {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {s['nll_best']:.3f} / {s['nll_avg']:.3f} "
                f"| {s['ece_best']:.3f} / {s['ece_avg']:.3f} | {s['brier_best']:.3f} / {s['brier_avg']:.3f} | {rho} |"
            )
    return lines, summary


def targets(summary: dict, tasks: list[str]) -> list[str]:
    lines = ["| target | task | measured | met |", "|---|---|---|---|"]
    spread_wins = 0
    for task in tasks:
        if any((task, m) not in summary for m in EVALS):
            continue
        lora, peft, pp, mean = (summary[(task, m)] for m in ("lora", "peft_mc", "ours_pp", "ours_mean"))
        lines.append(f"| LoRA best beats majority by ≥ 5 pts | {task} | {100 * lora['best']:.1f} vs "
                     f"{100 * lora['majority']:.1f} | {'yes' if lora['best'] - lora['majority'] >= 0.05 - TOL else 'no'} |")
        ratio = pp["spread"] / max(lora["spread"], 1e-9)
        spread_wins += ratio <= 0.5
        lines.append(f"| spread ≤ 0.5 × LoRA's (posterior predictive) | {task} | {100 * pp['spread']:.1f} / "
                     f"{100 * lora['spread']:.1f} = {ratio:.2f} | {'yes' if ratio <= 0.5 else 'no'} |")
        for name, s in (("posterior predictive", pp), ("mean adapter", mean)):
            ok = s["best"] >= lora["best"] - 0.005 - TOL
            lines.append(f"| best acc ≥ LoRA best − 0.5 pts ({name}) | {task} | {100 * s['best']:.1f} vs "
                         f"{100 * lora['best']:.1f} | {'yes' if ok else 'no'} |")
        for metric in ("ece", "nll"):
            for where in ("best", "avg"):
                key = f"{metric}_{where}"
                ok = pp[key] < lora[key] and pp[key] < peft[key]
                lines.append(f"| posterior-predictive {metric.upper()} < LoRA and peft_mc ({where}) | {task} | "
                             f"{pp[key]:.3f} vs {lora[key]:.3f} / {peft[key]:.3f} | {'yes' if ok else 'no'} |")
    lines.append(f"| spread ≤ 0.5 × LoRA's on ≥ 2 tasks | all | {spread_wins} task(s) | "
                 f"{'yes' if spread_wins >= 2 else 'no'} |")
    return lines


def plot(summary: dict, tasks: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if (t, "lora") in summary]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.5), squeeze=False)
    styles = ["-", "--", ":"]
    for column, task in enumerate(tasks):
        for method in EVALS:
            s = summary.get((task, method))
            if s is None:
                continue
            batch_sizes = sorted({b for _, b in s["per"]})
            for i, batch_size in enumerate(batch_sizes):
                lrs = sorted(lr for lr, b in s["per"] if b == batch_size)
                label = method if len(batch_sizes) == 1 else f"{method} bs{batch_size}"
                for row, metric in enumerate(("accuracy", "ece")):
                    axes[row][column].plot(
                        lrs, [s["per"][(lr, batch_size)][metric] for lr in lrs], styles[i % 3], marker="o",
                        label=label, color=f"C{EVALS.index(method)}")
        axes[0][column].axhline(summary[(task, "lora")]["majority"], color="grey", lw=0.8, ls=":", label="majority")
        axes[0][column].set_title(task)
        for row, metric in enumerate(("accuracy", "ECE (15 bins)")):
            axes[row][column].set_xscale("log")
            axes[row][column].set_xlabel("learning rate")
            axes[row][column].set_ylabel(metric)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 lrs, 1 batch size, small subsets (< 10 min)")
    parser.add_argument("--tasks", nargs="+", default=None,
                        help="default: vader boolq arc (vader boolq with --quick)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--lrs", nargs="+", type=float, default=None)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2, help="processes running jobs in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--from-json", default=None, help="re-summarize the raw records of an earlier (partial) run")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.tasks is None:
        args.tasks = QUICK_TASKS if args.quick else ["vader", "boolq", "arc"]
    if args.lrs:
        settings["lrs"] = args.lrs
    if args.batch_sizes:
        settings["batch_sizes"] = args.batch_sizes
    start = time.perf_counter()
    stem = "robustness_quick" if args.quick else "robustness"
    os.makedirs(args.out, exist_ok=True)
    raw = os.path.join(args.out, f"{stem}.json")

    def save(records):  # after every run, so an interrupted sweep keeps what it measured
        with open(raw, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=1, sort_keys=True)

    if args.from_json:
        with open(args.from_json, encoding="utf-8") as handle:
            records = json.load(handle)
        args.tasks = [t for t in args.tasks if any(r["task"] == t for r in records)]
    else:
        records = run_sweep(settings, args.tasks, args.seeds, lambda m: print(m, flush=True), save,
                            workers=args.workers, threads=args.threads)
    minutes = (time.perf_counter() - start) / 60
    table, summary = summarize(records, args.tasks)
    checks = targets(summary, args.tasks)
    command = "python -m benchmarks.robustness " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        f"# Robustness sweep{' (--quick)' if args.quick else ''}",
        "",
        f"Command: `{command.strip()}`; date: {datetime.date.today()}; {minutes:.1f} min on "
        f"{args.workers} worker process(es) x {args.threads} torch thread(s) on a 2-core machine.",
        f"MiniLM (all-MiniLM-L6-v2), LoRA r=16, alpha=32, dropout 0.05, all-linear; AdamW, linear schedule, "
        f"3% warm-up, clip 1.0, epochs {settings['epochs']}; learning rates {settings['lrs']}, batch sizes "
        f"{settings['batch_sizes']}, seeds {args.seeds}; train/test sizes {settings['sizes']} "
        "(arc: training (option, question) pairs / test questions).",
        "Tasks: vader = VADER word -> sign of mean rating; boolq = BoolQ question without passage -> true/false "
        "(class-balanced subsets); arc = ARC-Easy, (option, question) -> correct? trained as binary "
        "classification on each question's correct option and one random wrong one, scored as a 4-way softmax "
        "of the 4 options' log-odds; questions whose pairs fit 32 tokens.",
        "Methods: lora = plain peft LoRA; peft_mc = peft's MonteCLoRA variant (defaults, loss + "
        "`_get_monteclora_loss()`, deterministic at eval); ours_mean / ours_pp = pyro_monteclora (defaults) "
        f"with the mean adapter / the posterior predictive of S draws, S per task: {settings['num_draws']}.",
        "Best = the method's best (lr, batch size) by accuracy; avg = mean over the sweep. ρ: Spearman "
        "correlation of predictive entropy with the raters' standard deviation (VADER).",
        "",
        *table,
        "",
        "## Targets",
        "",
        *checks,
        "",
        f"![accuracy and ECE against learning rate]({stem}.png)",
        "",
    ])
    with open(os.path.join(args.out, f"{stem}.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    plot(summary, args.tasks, os.path.join(args.out, f"{stem}.png"))
    print(text)


if __name__ == "__main__":
    main()
