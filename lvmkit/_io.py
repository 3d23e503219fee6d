"""Crash-safe file writes: a crash leaves the old file or the new one, never a partial one.

Each write goes to a temporary file in the destination's folder, is flushed and fsynced,
and is then renamed over the destination with ``os.replace``, which is atomic on POSIX and
Windows; the folder is fsynced afterwards where the platform allows, so that the rename
survives a power loss too.

Example::

    >>> import os, tempfile, torch
    >>> from lvmkit._io import atomic_save
    >>> folder = tempfile.mkdtemp()
    >>> atomic_save({"step": 3}, os.path.join(folder, "state.pt"))
    >>> torch.load(os.path.join(folder, "state.pt"))
    {'step': 3}
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

__all__ = ["atomic_save", "atomic_write_bytes", "fsync_directory"]

PathLike = str | os.PathLike


def _atomic_write(
    path: PathLike,
    write: Callable[[IO[bytes]], None],
    prefix: str | None,
    before_replace: Callable[[], None] | None,
) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    if prefix is None:
        prefix = f".{os.path.basename(path)}-"
    handle, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def atomic_save(
    obj: Any,
    path: PathLike,
    *,
    prefix: str | None = None,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """``torch.save(obj)`` to ``path``, atomically (see the module docstring).

    The folder is created if missing; the temporary file is removed if anything fails.

    :param obj: anything ``torch.save`` accepts.
    :param path: the destination file.
    :param prefix: prefix of the temporary file's name (default: ``.<name>-``).
    :param before_replace: called once the new file is complete, just before the rename
        (e.g. to keep the previous file under another name).
    """
    import torch

    _atomic_write(path, lambda stream: torch.save(obj, stream), prefix, before_replace)


def atomic_write_bytes(
    data: bytes,
    path: PathLike,
    *,
    prefix: str | None = None,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Write ``data`` to ``path``, atomically; arguments as for :func:`atomic_save`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    _atomic_write(path, lambda stream: stream.write(data), prefix, before_replace)


def fsync_directory(directory: PathLike) -> None:
    """Make the renames in ``directory`` durable (POSIX); a no-op where folders cannot be
    opened (Windows)."""
    try:
        handle = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
