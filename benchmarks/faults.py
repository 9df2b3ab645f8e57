"""Issue #30's fault campaign: SIGKILL at random moments, ENOSPC and EIO at each write call, generated bad input.

Operations (tiny models of :mod:`pyro_monteclora.testing`, one thread):

- ``train``: ``train(tiny Llama, output_dir=..., save_steps=1)`` with the final merged save; after
  the kill, the run is repeated with ``resume_from_checkpoint=True`` (from scratch when no
  checkpoint was complete yet) and must give exactly the output of an uninterrupted run;
- ``save_adapter`` / ``save_merged``: ``save_pretrained`` / ``save_merged`` of adapter B over a
  folder holding adapter A;
- ``merge``: the merge tool writing B's merged model over A's;
- ``kohya``: the Kohya export of B over A's file.

A SIGKILL trial forks the operation and kills it after a delay drawn uniformly from [0, the
operation's uninterrupted duration]; an ENOSPC or EIO trial makes the n-th write call of the
save fail (every ``open(...).write`` and every safetensors ``save_file``, patched where they are
bound; a failing ``save_file`` leaves a half file). After each fault the target must be the
previous complete version or the new one (bitwise, and it loads); the next run must leave no
temporary or lock file and give the new version. Each finished trial is saved in
``benchmarks/results/faults/`` so a cut run resumes; ``--fuzz N`` also runs the generated bad
inputs of :mod:`benchmarks.fuzz` (N cases per target). Writes ``benchmarks/results/faults.md``.

    python -m benchmarks.faults --trials 50 --fuzz 1000      # the full campaign
    python -m benchmarks.faults --trials 3 --fuzz 0          # a quick look
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # noqa: E402  (before torch: one thread, fork-safe)

import argparse
import builtins
import contextlib
import datetime
import errno
import hashlib
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import torch

RESULTS = os.path.join("benchmarks", "results")
TRIALS_DIR = os.path.join(RESULTS, "faults")
OPERATIONS = ("train", "save_adapter", "save_merged", "merge", "kohya")
WRITE_FAULTS = {"enospc": errno.ENOSPC, "eio": errno.EIO}
TRAIN_ROWS = [{"prompt": f"w{i % 5} is", "completion": f" w{(3 * i) % 5}"} for i in range(8)]


# --- what a folder or file holds ---------------------------------------------------------------


def file_hash(path: str) -> str:
    """sha256 of a file; of a safetensors file, of its tensors' bytes, dtypes, shapes and metadata in
    sorted order (safetensors writes its header's metadata in an order that changes between runs)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            sha = hashlib.sha256()
            with safe_open(path, framework="pt") as handle:
                sha.update(json.dumps(handle.metadata() or {}, sort_keys=True).encode())
                for key in sorted(handle.keys()):
                    tensor = handle.get_tensor(key).contiguous()
                    sha.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                    sha.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
            return sha.hexdigest()
        except Exception:  # noqa: BLE001 - a damaged file: its raw bytes, which match no version
            pass
    with open(path, "rb") as handle:
        return "raw:" + hashlib.sha256(handle.read()).hexdigest()


def digest(path: str, skip_checkpoints: bool = False) -> dict[str, str]:
    """:func:`file_hash` of every file under ``path`` (or of the file), by relative path."""
    if os.path.isfile(path):
        return {"": file_hash(path)}
    out = {}
    for root, dirs, files in os.walk(path):
        if skip_checkpoints:
            dirs[:] = [d for d in dirs if not d.startswith("checkpoint-")]
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = file_hash(full)
    return out


def tensors_digest(path: str) -> dict[str, str]:
    """The safetensors files of an output (checkpoints aside): what "the same model" means."""
    return {k: v for k, v in digest(path, skip_checkpoints=True).items() if k.endswith(".safetensors")}


def stray(parent: str) -> list[str]:
    """Hidden temporary, backup or lock entries in ``parent``."""
    return sorted(e for e in os.listdir(parent) if e.startswith(".") and (".tmp-" in e or ".old-" in e or e.endswith(".lock")))


# --- running an operation in a child that can be killed ------------------------------------------


def run_forked(operation: Callable[[], None], kill_after: Optional[float] = None, timeout: float = 300.0) -> str:
    """Run ``operation`` in a forked child; SIGKILL it after ``kill_after`` seconds.

    Returns ``"killed"``, ``"finished"`` (exit 0 before the kill) or ``"failed: <code>"``.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        code = 0
        try:
            torch.set_num_threads(1)
            operation()
        except BaseException as error:  # noqa: BLE001 - reported through the exit code and the pipe
            os.write(write, f"{type(error).__name__}: {error}"[:2000].encode())
            code = 1
        os._exit(code)
    os.close(write)
    deadline = time.monotonic() + (kill_after if kill_after is not None else timeout)
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.002)
    else:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as handle:
        message = handle.read().decode(errors="replace")
    if os.WIFSIGNALED(status):
        return "killed" if kill_after is not None else "failed: hung"
    return "finished" if os.WEXITSTATUS(status) == 0 else f"failed: {message}"


# --- injected write errors ------------------------------------------------------------------------


class WriteFaults:
    """Count write calls (``open(...).write`` for writing, safetensors ``save_file``); fail call ``fail_at``.

    Example:
        >>> with WriteFaults(fail_at=None) as faults:
        ...     pass
        >>> faults.calls
        0
    """

    def __init__(self, fail_at: Optional[int], code: int = errno.ENOSPC):
        self.fail_at, self.code, self.calls = fail_at, code, 0

    def _tick(self, what: str) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise OSError(self.code, os.strerror(self.code), what)

    def __enter__(self) -> "WriteFaults":
        import safetensors.torch

        faults, real_open, real_save = self, builtins.open, safetensors.torch.save_file

        class File:
            def __init__(self, handle: Any, name: str):
                self._handle, self._name = handle, name

            def write(self, data: Any) -> int:
                faults._tick(self._name)
                return self._handle.write(data)

            def __getattr__(self, attr: str) -> Any:
                return getattr(self._handle, attr)

            def __enter__(self) -> "File":
                self._handle.__enter__()
                return self

            def __exit__(self, *exc: Any) -> Any:
                return self._handle.__exit__(*exc)

            def __iter__(self) -> Iterator:
                return iter(self._handle)

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and not str(file).endswith(".lock"):
                return File(handle, str(file))
            return handle

        def save_file(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
            try:
                faults._tick(str(filename))
            except OSError:
                with real_open(filename, "wb") as handle:
                    handle.write(b"\0" * 64)  # what a full disk leaves: a half file
                raise
            real_save(tensors, filename, *args, **kwargs)

        self._patched = [(builtins, "open", real_open)]
        builtins.open = open_
        for module in list(sys.modules.values()):
            for name, value in list(getattr(module, "__dict__", {}).items()):
                if value is real_save:
                    self._patched.append((module, name, value))
                    setattr(module, name, save_file)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, value in self._patched:
            setattr(module, name, value)


# --- the operations -----------------------------------------------------------------------------


class Setup:
    """The inputs of every operation (built once, in the parent, before any fork) and the reference outputs."""

    def __init__(self, root: str):
        from pyro_monteclora import MonteCLoRA
        from pyro_monteclora.io import save_merged, save_pretrained
        from pyro_monteclora.testing import tiny_bert

        self.root = root
        tiny_bert(seed=0).save_pretrained(os.path.join(root, "base"))
        self.models = {}
        for name, seed in (("A", 1), ("B", 2)):
            mc = MonteCLoRA.from_model(tiny_bert(seed=0), lora_r=4)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for n, p in mc.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=gen))
            self.models[name] = mc
            save_pretrained(mc, os.path.join(root, f"adapter{name}"))
        self.save = {"save_adapter": save_pretrained, "save_merged": save_merged}
        self.reference: dict[str, dict[str, dict[str, str]]] = {}
        self.versions: dict[str, dict[str, str]] = {}
        for op in ("save_adapter", "save_merged", "merge", "kohya"):
            for name in ("A", "B"):
                target = self.target(op, os.path.join(root, f"ref-{op}-{name}"))
                self.write(op, name, target)
                self.reference.setdefault(op, {})[name] = digest(target)
                self.versions[f"{op}-{name}"] = target

    def target(self, op: str, base: str) -> str:
        return base + ".safetensors" if op == "kohya" else base

    def write(self, op: str, name: str, target: str) -> None:
        """Write version ``name`` of ``op``'s output at ``target``."""
        from pyro_monteclora.export.kohya import peft_to_kohya
        from pyro_monteclora.export.merge import merge

        if op in self.save:
            self.save[op](self.models[name], target)
        elif op == "merge":
            merge(os.path.join(self.root, "base"), os.path.join(self.root, f"adapter{name}"), target)
        else:
            peft_to_kohya(os.path.join(self.root, f"adapter{name}"), target, overwrite=True)

    def loads(self, op: str, target: str) -> bool:
        """Whether ``target`` loads with the package's own readers."""
        import pyro_monteclora
        from safetensors.torch import load_file

        from pyro_monteclora.testing import tiny_bert

        if op == "kohya":
            load_file(target)
        else:
            folder = os.path.join(target, "adapter") if op != "save_adapter" else target
            pyro_monteclora.load(tiny_bert(seed=0), folder)
        return True


def train_operation(output_dir: str, resume: bool) -> Callable[[], None]:
    def run() -> None:
        import pyro_monteclora
        from pyro_monteclora.testing import tiny_llama, toy_tokenizer

        words = [f"w{i}" for i in range(5)] + ["is"]
        pyro_monteclora.train(
            tiny_llama(vocab_size=16), TRAIN_ROWS, tokenizer=toy_tokenizer(words), output_dir=output_dir,
            save_steps=1, num_epochs=2, batch_size=4, lora_r=4, learning_rate=1e-2, progress=False, seed=3,
            merge_adapter=True, resume_from_checkpoint=True if resume else None,
        )

    return run


def train_trial(work: str, reference: dict[str, str], duration: float, rng: random.Random) -> dict[str, Any]:
    """SIGKILL a training run at a random moment, rerun it (resuming if it can), compare with ``reference``."""
    from pyro_monteclora.train.checkpoints import latest_checkpoint

    parent = tempfile.mkdtemp(dir=work)
    out = os.path.join(parent, "out")
    delay = rng.uniform(0, duration)
    outcome = run_forked(train_operation(out, resume=False), kill_after=delay)
    problems = []
    if outcome.startswith("failed"):
        problems.append(outcome)
    if os.path.isfile(os.path.join(out, "config.json")) and tensors_digest(out) != reference:
        problems.append("after the kill the output is neither absent nor the finished model")
    if outcome == "killed":  # what a user does: resume if a checkpoint was complete, else start again
        left = [os.path.join(parent, e) for e in os.listdir(parent) if e.startswith((".out.tmp-", ".out.old-"))]
        resume = any(latest_checkpoint(folder) is not None for folder in [out, *left])
        again = run_forked(train_operation(out, resume=resume))
        if again != "finished":
            problems.append(f"rerun: {again}")
    if tensors_digest(out) != reference:
        problems.append("the resumed output differs from an uninterrupted run")
    if stray(parent):
        problems.append(f"left behind: {stray(parent)}")
    shutil.rmtree(parent, ignore_errors=True)
    return {"delay": round(delay, 4), "outcome": outcome, "survived": not problems, "problems": problems}


def kill_trial(setup: Setup, op: str, work: str, duration: float, rng: random.Random) -> dict[str, Any]:
    """SIGKILL ``op`` writing B over A at a random moment; the target must be A or B, and the next run B."""
    parent = tempfile.mkdtemp(dir=work)
    target = setup.target(op, os.path.join(parent, "out"))
    copy = shutil.copy2 if op == "kohya" else shutil.copytree
    copy(setup.versions[f"{op}-A"], target)
    delay = rng.uniform(0, duration)
    outcome = run_forked(lambda: setup.write(op, "B", target), kill_after=delay)
    return _check_after(setup, op, parent, target, {"delay": round(delay, 4), "outcome": outcome})


def write_fault_trial(setup: Setup, op: str, work: str, code: int, call: int) -> dict[str, Any]:
    """Fail the ``call``-th write call of ``op`` writing B over A with ``code``."""
    parent = tempfile.mkdtemp(dir=work)
    target = setup.target(op, os.path.join(parent, "out"))
    (shutil.copy2 if op == "kohya" else shutil.copytree)(setup.versions[f"{op}-A"], target)
    outcome = "finished"
    try:
        with WriteFaults(call, code):
            setup.write(op, "B", target)
    except OSError as error:
        outcome = "refused" if error.errno == code else f"failed: {error}"
    except Exception as error:  # noqa: BLE001 - any other error is a finding
        outcome = f"failed: {type(error).__name__}: {error}"
    return _check_after(setup, op, parent, target, {"call": call, "outcome": outcome})


def _check_after(setup: Setup, op: str, parent: str, target: str, record: dict[str, Any]) -> dict[str, Any]:
    problems = [record["outcome"]] if record["outcome"].startswith("failed") else []
    now = digest(target) if os.path.exists(target) else None
    which = next((v for v, d in setup.reference[op].items() if d == now), None)
    if which is None:
        problems.append("the target is neither the previous version nor the new one")
    else:
        try:
            setup.loads(op, target)
        except Exception as error:  # noqa: BLE001
            problems.append(f"does not load: {error}")
    setup.write(op, "B", target)  # the next run
    if digest(target) != setup.reference[op]["B"]:
        problems.append("the next run did not give the new version")
    if stray(parent):
        problems.append(f"left behind: {stray(parent)}")
    shutil.rmtree(parent, ignore_errors=True)
    return {**record, "found": which, "survived": not problems, "problems": problems}


def count_write_calls(setup: Setup, op: str, work: str) -> int:
    parent = tempfile.mkdtemp(dir=work)
    target = setup.target(op, os.path.join(parent, "out"))
    (shutil.copy2 if op == "kohya" else shutil.copytree)(setup.versions[f"{op}-A"], target)
    with WriteFaults(None) as faults:
        setup.write(op, "B", target)
    shutil.rmtree(parent, ignore_errors=True)
    return faults.calls


def timed(operation: Callable[[], None], repeats: int = 3) -> float:
    """The median duration of ``operation`` in a forked child, after one run in this process (which
    imports what it needs once, so that every child starts alike)."""
    operation()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        outcome = run_forked(operation)
        if outcome != "finished":
            raise RuntimeError(f"the uninterrupted operation failed: {outcome}")
        durations.append(time.perf_counter() - start)
    return sorted(durations)[len(durations) // 2]


# --- the campaign -------------------------------------------------------------------------------


def campaign(trials: int, seed: int, work: str, store: Optional[str], operations=OPERATIONS,
             faults=tuple(WRITE_FAULTS), calls: Optional[int] = None) -> dict[str, list[dict[str, Any]]]:
    """Run (or resume from ``store``) ``trials`` SIGKILL trials per operation and the write faults
    (at every write call of each save, or at ``calls`` of them drawn with ``seed``)."""
    torch.set_num_threads(1)
    setup = Setup(tempfile.mkdtemp(dir=work))
    results: dict[str, list[dict[str, Any]]] = {}

    def done(key: str) -> list[dict[str, Any]]:
        path = os.path.join(store, f"{key}.json") if store else None
        if key not in results:
            results[key] = json.load(open(path)) if path and os.path.exists(path) else []
        return results[key]

    def save(key: str) -> None:
        if store:
            os.makedirs(store, exist_ok=True)
            with open(os.path.join(store, f"{key}.json"), "w") as handle:
                json.dump(results[key], handle, indent=1)

    for op in operations:
        key = f"sigkill-{op}"
        have = done(key)
        if len(have) >= trials:
            continue
        if op == "train":
            ref_dir = os.path.join(tempfile.mkdtemp(dir=work), "out")
            duration = timed(lambda: (shutil.rmtree(ref_dir, ignore_errors=True), train_operation(ref_dir, False)()))
            reference = tensors_digest(ref_dir)
        else:
            parent = tempfile.mkdtemp(dir=work)
            target = setup.target(op, os.path.join(parent, "out"))
            (shutil.copy2 if op == "kohya" else shutil.copytree)(setup.versions[f"{op}-A"], target)
            duration = timed(lambda: setup.write(op, "B", target))
        for i in range(len(have), trials):
            rng = random.Random(f"{seed}-{op}-{i}")
            trial = (train_trial(work, reference, duration, rng) if op == "train"
                     else kill_trial(setup, op, work, duration, rng))
            have.append({"trial": i, **trial})
            save(key)
            print(f"{key} {i}: {trial['outcome']} {'ok' if trial['survived'] else trial['problems']}", flush=True)
    for op in operations:
        if op == "train":
            continue
        total = count_write_calls(setup, op, work)
        for fault in faults:
            key = f"{fault}-{op}"
            have = done(key)
            chosen = list(range(1, total + 1))
            if calls is not None and calls < total:
                chosen = sorted(random.Random(f"{seed}-{fault}-{op}").sample(chosen, calls))
            for call in chosen[len(have):]:
                have.append(write_fault_trial(setup, op, work, WRITE_FAULTS[fault], call))
                save(key)
            print(f"{key}: {sum(t['survived'] for t in have)}/{len(have)} survived", flush=True)
    return results


def report(results: dict[str, list[dict[str, Any]]], fuzz: dict[str, int], command: str, seconds: float) -> str:
    lines = [
        "# Fault campaign (issue #30)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}; {seconds:.0f} s on {os.cpu_count()} CPU cores, one torch thread "
        "(the last run only: finished trials are kept in `benchmarks/results/faults/` and a run resumes from them).",
        "",
        "SIGKILL at a moment drawn uniformly from [0, the uninterrupted duration] (forked child); ENOSPC and "
        "EIO at each write call of the save in turn. Survived: after the fault the target is the previous "
        "complete version or the new one (bitwise, and it loads); the next run leaves no temporary or lock file "
        "and gives the new version (training: resumed from the newest complete checkpoint, bitwise equal to an "
        "uninterrupted run). Hit mid-operation: the SIGKILL came before the operation ended, or the injected "
        "error made the save fail (the rest finished first and were checked the same way).",
        "",
        "| operation | fault | trials | hit mid-operation | survived |",
        "|---|---|---|---|---|",
    ]
    for key, trials in results.items():
        fault, op = key.split("-", 1)
        mid = sum(t["outcome"] in ("killed", "refused") for t in trials)
        lines.append(f"| {op} | {fault} | {len(trials)} | {mid} | {sum(t['survived'] for t in trials)} |")
    failures = [(k, t) for k, ts in results.items() for t in ts if not t["survived"]]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {k} {t}" for k, t in failures[:20]]
    if fuzz:
        lines += ["", "Generated bad input (`benchmarks/fuzz.py`, hypothesis): cases per target, each ended accepted "
                  "(and valid) or in one of our errors naming the bad value, nothing written.", "", "| target | cases |", "|---|---|"]
        lines += [f"| {name} | {count} |" for name, count in fuzz.items()]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50, help="SIGKILL trials per operation")
    parser.add_argument("--fuzz", type=int, default=1000, help="generated bad inputs per target (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    parser.add_argument("--calls", type=int, default=None, help="write calls faulted per save (default: every one)")
    parser.add_argument("--fresh", action="store_true", help="forget the saved trials")
    args = parser.parse_args(argv)
    if args.fresh:
        shutil.rmtree(TRIALS_DIR, ignore_errors=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faults-") as work:
        results = campaign(args.trials, args.seed, work, TRIALS_DIR, tuple(args.operations), calls=args.calls)
    fuzz = {}
    if args.fuzz:
        from benchmarks.fuzz import run_all

        fuzz = run_all(args.fuzz, seed=args.seed)
    command = "python -m benchmarks.faults " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, fuzz, command.strip(), time.perf_counter() - start)
    with open(os.path.join(RESULTS, "faults.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
