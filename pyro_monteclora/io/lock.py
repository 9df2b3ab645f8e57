"""One writer per output: an operating-system lock held while a folder or file is written.

Every writer of the package (``train(output_dir=...)``, :func:`~pyro_monteclora.io.save_pretrained`
and the other savers, the merge tool, the Kohya export, the CLI commands) holds
:func:`hold_output` on its target for the whole job. A second writer of the same target, in
another process or thread, fails at once, before any work, with :class:`OutputLocked`, which
names the target and the holder (pid, host, start time and command, written into the lock file).
Readers (:func:`~pyro_monteclora.load`, ``evaluate``) take no lock.

The lock is ``flock`` on a hidden file beside the target, ``.<name>.lock`` (beside, not inside:
a folder is replaced by a rename, :func:`~pyro_monteclora.io.atomic.atomic_write`), through the
``filelock`` package. The operating system frees it when its process ends, however it ends: a
lock file left by a killed process never blocks the next run. The holder removes the file when
it is done, and any parent folders it created for it that stayed empty. Holds nest within a
thread, so a saver called by a writer that already holds the target goes on. In a run of
several processes only the main one (global rank 0) writes and holds (:func:`is_main_process`).

Example:
    >>> import os, tempfile
    >>> from pyro_monteclora.io.lock import OutputLocked, hold_output, holder_of
    >>> target = os.path.join(tempfile.mkdtemp(), "out")
    >>> with hold_output(target):
    ...     holder_of(target)["pid"] == os.getpid()
    True
    >>> holder_of(target) is None     # released: the lock file is gone
    True
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
from typing import Any, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]  # as io.format's; this module imports nothing of the package

__all__ = ["OutputLocked", "hold_output", "holder_of", "lock_path", "is_main_process"]

#: The environment variables that give a process's global rank (torchrun/accelerate, Open MPI, MPICH).
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")

_held: dict[tuple[int, int, str], int] = {}  # (pid, thread, target) -> nesting depth
_guard = threading.Lock()


class OutputLocked(RuntimeError):
    """Another writer holds this output; raised before any work.

    Attributes:
        path: the output folder or file.
        holder: what the holder wrote into the lock file (``pid``, ``host``, ``started``,
            ``command``), or ``None`` if it could not be read.
    """

    def __init__(self, path: str, holder: Optional[dict[str, Any]]):
        self.path, self.holder = path, holder
        if holder:
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                   + (f": {holder['command']}" if holder.get("command") else ""))
        else:
            who = "a process that did not record itself"
        super().__init__(
            f"{path} is being written by another process ({who}); nothing was done: wait until it ends or "
            f"choose another output (the lock is {lock_path(path)}; the system frees it when its holder exits)"
        )


def lock_path(path: PathLike) -> str:
    """The lock file of the output ``path``: ``.<name>.lock`` in the same parent folder.

    Example:
        >>> lock_path("/data/runs/out")
        '/data/runs/.out.lock'
    """
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


def holder_of(path: PathLike) -> Optional[dict[str, Any]]:
    """What the current (or last killed) holder of ``path`` wrote into its lock file, or ``None``."""
    try:
        with open(lock_path(path), encoding="utf-8") as handle:
            record = json.loads(handle.read() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_main_process() -> bool:
    """Whether this process is the main one (global rank 0, or not part of a multi-process run)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value) == 0
    return True


def _record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(_redacted(sys.argv))[:300],
    }


def _redacted(argv: list[str]) -> list[str]:
    """``argv`` without secrets: the value of ``--token`` and anything shaped like a Hub token.

    Example:
        >>> _redacted(["merge", "--token", "abc", "--token=abc", "hf_abc", "out"])
        ['merge', '--token', '***', '--token=***', '***', 'out']
    """
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "--token" or arg.startswith("hf_"):
            arg = "***"
        elif arg.startswith("--token="):
            arg = "--token=***"
        out.append(arg)
    return out


def _make_parents(folder: str) -> list[str]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot create {missing[-1] if missing else folder}: {folder} is not a folder")
    for entry in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(entry)
    return missing


@contextlib.contextmanager
def hold_output(path: PathLike) -> Iterator[str]:
    """Hold the one-writer lock of the output folder or file ``path`` for the block.

    Raises :class:`OutputLocked` at once if another process or thread holds it. Re-entrant in
    the thread that holds it. Yields the absolute path. Missing parent folders are created (the
    lock file lives there) and removed afterwards if they stayed empty.
    """
    from filelock import FileLock, Timeout

    target = os.path.abspath(os.fspath(path))
    key = (os.getpid(), threading.get_ident(), target)
    with _guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield target
        finally:
            with _guard:
                _held[key] -= 1
        return
    created = _make_parents(os.path.dirname(target))
    lock_file = lock_path(target)
    lock = FileLock(lock_file, timeout=0, thread_local=False)
    for attempt in range(3):  # a holder that released meanwhile (its file gone) is no holder: try again
        try:
            lock.acquire()
            break
        except Timeout:
            if attempt == 2 or os.path.exists(lock_file):
                _remove_empty(created)
                raise OutputLocked(target, holder_of(target)) from None
    try:
        with contextlib.suppress(OSError), open(lock_file, "r+", encoding="utf-8") as handle:
            handle.truncate(0)  # the holder's record, for the refused; the lock holds without it (a full disk)
            handle.write(json.dumps(_record(), sort_keys=True))
        with _guard:
            _held[key] = 1
        yield target
    finally:  # an interrupt in here at worst leaves the lock file, which blocks no one
        with _guard:
            _held.pop(key, None)
        with contextlib.suppress(OSError):
            os.remove(lock_file)  # while still held: a waiter that opened it sees an unlinked file
        lock.release()
        _remove_empty(created)


def _remove_empty(folders: list[str]) -> None:
    for folder in folders:  # deepest first
        try:
            os.rmdir(folder)
        except OSError:
            return
