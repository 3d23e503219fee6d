"""Crash-safe file writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

__all__ = ["atomic_save"]


def atomic_save(obj: Any, path: str | os.PathLike, *, prefix: str | None = None) -> None:
    """``torch.save(obj)`` to ``path`` so that a crash leaves the old file or the new, never
    a partial one.

    Writes a temporary file in the same folder (created if missing), flushes and fsyncs it,
    then renames it over ``path`` with ``os.replace``, which is atomic on POSIX and Windows;
    the folder is fsynced too where the platform allows, so the rename survives a power
    loss. The temporary file is removed if anything fails.

    :param obj: anything ``torch.save`` accepts.
    :param path: the destination file.
    :param prefix: prefix of the temporary file's name (default: ``.<name>-``).
    """
    import torch

    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    if prefix is None:
        prefix = f".{os.path.basename(path)}-"
    handle, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Opening a folder read-only is POSIX-only; Windows has no folder fsync to do.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
