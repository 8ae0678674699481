"""Atomic file writes: the one helper every module that saves a file goes through.

``atomic_write(path, write)`` lets ``write(binary_file)`` fill a temporary file in the same
folder, flushes and ``fsync``-s it, renames it over ``path`` with ``os.replace`` (atomic on
POSIX and Windows) and syncs the folder entry. A crash at any moment leaves either the
complete new file or the old one, never a partial file. On any exception the temporary file
is removed, ``path`` is untouched and the exception propagates. Temporary files are named
``.tmp-<name>-<random><suffix>`` so a scanner can ignore them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"
"""Prefix of the temporary files :func:`atomic_write` creates (and removes)."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; the rename is durable
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None]) -> Path:
    """Write ``path`` atomically through ``write(binary_file)`` (see the module docstring).

    Returns ``path`` as a :class:`~pathlib.Path`. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{path.stem}-", suffix=path.suffix, dir=path.parent
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """``atomic_write`` of a bytes object."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``atomic_write`` of a string, UTF-8 encoded."""
    return atomic_write_bytes(path, text.encode("utf-8"))


__all__ = ["TEMP_PREFIX", "atomic_write", "atomic_write_bytes", "atomic_write_text"]
