"""Output folders: the rule for replacing one, an atomic move into place, and the finiteness check.

Every writer of :mod:`pyro_monteclora.io.save` builds its folder beside the target and moves it
into place with :func:`atomic_write`, so a failure (or Ctrl-C) leaves an existing folder as it
was; tensors that are not finite are refused before anything is written.

Example:
    >>> import os, tempfile
    >>> from pyro_monteclora.io.atomic import atomic_write
    >>> target = os.path.join(tempfile.mkdtemp(), "out")
    >>> folder = atomic_write(target, False, lambda tmp: open(os.path.join(tmp, "a.txt"), "w").close())
    >>> os.listdir(folder)
    ['a.txt']
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any, Callable, Iterator

import torch

from .format import ADAPTER_SUBFOLDER, CHECKPOINT_PREFIX, CONFIG_NAME, PathLike
from .lock import hold_output

__all__ = [
    "check_finite",
    "check_output_folder",
    "check_writable",
    "atomic_write",
    "atomic_write_file",
    "checkpoints_in",
    "deferred_interrupts",
    "leftovers",
    "recover_output",
]


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write ``tensors`` if any is not finite (``ValueError`` naming the first one)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"refusing to save {what}: {len(bad)} tensor(s) hold nan or inf, first {bad[0]!r}; "
            "the model diverged (lower the learning rate or sample_scaler); nothing was written"
        )


def checkpoints_in(folder: str) -> list[str]:
    """The ``checkpoint-<step>`` subfolders of ``folder``, sorted."""
    return sorted(
        e for e in os.listdir(folder) if e.startswith(CHECKPOINT_PREFIX) and os.path.isdir(os.path.join(folder, e))
    )


def is_own_output(folder: str) -> bool:
    """Whether ``folder`` was written by pyro-monteclora (an output, or only training checkpoints so far)."""
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)) or os.path.isfile(
        os.path.join(folder, ADAPTER_SUBFOLDER, CONFIG_NAME)
    ):
        return True
    entries = os.listdir(folder)
    return bool(entries) and sorted(entries) == checkpoints_in(folder)  # only training checkpoints so far


def check_output_folder(folder: str, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder not written by us unless ``overwrite``."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder!r} exists and is not a folder: the output is a folder, choose another path")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite and not is_own_output(folder):
        raise FileExistsError(
            f"{folder!r} is not empty and is not a pyro-monteclora output; choose another folder or pass "
            "overwrite=True (--overwrite) to replace it"
        )


def check_writable(path: PathLike, overwrite: bool, kind: str = "folder") -> str:
    """Before any work: refuse a target that cannot become the output, then probe its parent with a real write.

    ``kind="folder"`` follows :func:`check_output_folder` (a file is refused even with
    ``overwrite``); ``kind="file"`` refuses a folder, and an existing file unless ``overwrite``.
    The nearest existing parent must be a folder we can write a file in (a link there must
    resolve), and so must the output folder itself if it exists (training writes its checkpoints
    there); nothing is created.
    Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    if kind == "folder":
        check_output_folder(path, overwrite)
    elif kind != "file":
        raise ValueError(f"kind must be 'folder' or 'file', got {kind!r}")
    elif os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; the output is a file: choose a file path")
    elif os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if os.path.islink(parent) and not os.path.exists(parent):
        raise FileNotFoundError(f"cannot create {path}: {parent} is a link to {os.readlink(parent)!r}, which does not exist")
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot create {path}: {parent} is a file, not a folder")
    # the parent receives the finished output; an existing output folder also receives the checkpoints
    for folder in (parent, path) if kind == "folder" and os.path.isdir(path) else (parent,):
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise PermissionError(f"cannot write to {folder}: {error.strerror}") from None
    return path


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block has run to its end, then deliver it.

    Used around the few renames that swap a finished folder into place and the removal of the
    backup, so an interrupt never leaves a half-swapped output or a hidden ``.old-*`` folder.
    Outside the main thread (where signals cannot be handled) the block simply runs.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def atomic_write(folder: PathLike, overwrite: bool, write: Any) -> str:
    """Run ``write(tmp)`` in a temporary folder beside ``folder``, then move it into place.

    A failure, Ctrl-C or SIGKILL while writing leaves ``folder`` as it was (what a kill left
    beside it is cleared by the next write, :func:`recover_output`); Ctrl-C during the swap is
    held until the new folder is in place and the old one gone.
    Training checkpoints of an earlier output move into the new one. The one-writer lock of
    ``folder`` is held throughout (:func:`pyro_monteclora.io.lock.hold_output`): a second writer
    gets :class:`~pyro_monteclora.io.lock.OutputLocked` before anything is written.
    """
    folder = os.path.abspath(os.fspath(folder))
    with hold_output(folder):
        recover_output(folder)  # what a killed writer left
        check_output_folder(folder, overwrite)
        parent = os.path.dirname(folder)
        with deferred_interrupts():
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the output gets the usual permissions
        try:
            write(tmp)
        except BaseException:
            with deferred_interrupts():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        with deferred_interrupts():
            _swap(tmp, folder)
    return folder


def atomic_write_file(path: PathLike, data: "bytes | Callable[[str], None]") -> str:
    """Write ``data`` to the file ``path`` through a temporary file beside it and a rename.

    ``data``: the bytes, or a writer ``write(tmp_path)`` that writes the temporary file itself
    (e.g. safetensors' ``save_file``). A failure or Ctrl-C leaves an existing file as it was and
    no temporary file; the one-writer lock of ``path`` is held throughout (re-entrant: a caller
    may already hold it). Returns the absolute path.

    Example:
        >>> import os, tempfile
        >>> path = atomic_write_file(os.path.join(tempfile.mkdtemp(), "m.json"), b"{}")
        >>> open(path).read()
        '{}'
    """
    path = os.path.abspath(os.fspath(path))
    with hold_output(path):
        recover_output(path)
        with deferred_interrupts():
            handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
        try:
            if callable(data):
                os.close(handle)
                data(tmp)
            else:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the output gets the usual permissions
            os.replace(tmp, path)
        except BaseException:
            with deferred_interrupts():
                if os.path.exists(tmp):
                    os.remove(tmp)
            raise
    return path


def _swap(tmp: str, folder: str) -> None:
    """Put ``tmp`` in the place of ``folder`` (keeping its checkpoints); on failure restore it.

    Where the system can (Linux ``renameat2(RENAME_EXCHANGE)``) the two folders trade places in
    one step, so ``folder`` is at every moment the previous version or the new one, even under
    SIGKILL; the checkpoints then move over and the old version is removed. Elsewhere the old
    folder is moved aside first; a kill between the two renames is repaired by
    :func:`recover_output` at the next write.
    """
    if os.path.exists(folder) and _exchange(tmp, folder):
        for name in checkpoints_in(tmp):  # tmp now holds the previous version
            if not os.path.exists(os.path.join(folder, name)):
                os.rename(os.path.join(tmp, name), os.path.join(folder, name))
        shutil.rmtree(tmp, ignore_errors=True)
        return
    parent = os.path.dirname(folder)
    backup = None
    kept: list[str] = []
    if os.path.exists(folder):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=parent)
        os.rmdir(backup)
        os.rename(folder, backup)
    try:
        if backup is not None:  # training checkpoints stay with the output they belong to
            for name in checkpoints_in(backup):
                os.rename(os.path.join(backup, name), os.path.join(tmp, name))
                kept.append(name)
        os.rename(tmp, folder)
    except BaseException:
        if backup is not None:
            for name in kept:
                os.rename(os.path.join(tmp, name), os.path.join(backup, name))
            os.rename(backup, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (Linux); ``False`` where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # a kernel or file system without the flag: two renames instead
    raise OSError(code, os.strerror(code), a)


def leftovers(path: PathLike) -> list[str]:
    """What killed writers of ``path`` left beside it: ``.<name>.tmp-*`` and ``.<name>.old-*`` entries."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(parent):
        return []
    prefixes = (f".{name}.tmp-", f".{name}.old-")
    return sorted(os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(prefixes))


def recover_output(path: PathLike) -> None:
    """Repair what a killed writer of ``path`` left; the caller holds ``path``'s lock.

    A missing ``path`` with an ``.old-*`` folder beside it (a kill between the two renames of a
    swap) gets that previous version back; training checkpoints found in any leftover move into
    ``path`` (never over one it has); then every leftover is removed. Every writer of the package
    calls this first, so a crash leaves no temporary files behind the next run.
    """
    path = os.path.abspath(os.fspath(path))
    found = leftovers(path)
    old = [e for e in found if os.path.basename(e).startswith(f".{os.path.basename(path)}.old-") and os.path.isdir(e)]
    with deferred_interrupts():
        if not os.path.lexists(path) and old:
            os.rename(old[0], path)
            found.remove(old[0])
        for entry in found:
            if os.path.isdir(entry) and not os.path.islink(entry):
                if os.path.isdir(path):
                    for name in checkpoints_in(entry):
                        if not os.path.exists(os.path.join(path, name)):
                            os.rename(os.path.join(entry, name), os.path.join(path, name))
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(entry)
