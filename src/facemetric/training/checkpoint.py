"""Atomic, resumable checkpoints: ``checkpoint_<step>.pt`` files in the run's folder.

A checkpoint is written to a temporary file in the same folder, flushed and ``fsync``-ed,
then renamed over its final name with ``os.replace`` (atomic on POSIX and Windows) and the
folder entry is synced: a crash at any moment leaves either the complete new file or none,
never a partial ``checkpoint_*.pt``. A failed save removes its temporary file; temporary
files left by a killed process are ignored by :func:`latest_checkpoint` and removed by the
next save. Only the newest ``keep`` checkpoints are kept.

Contents are plain containers of tensors, numbers and strings (NumPy and Python RNG states
are converted), so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: file name of the checkpoint after ``step`` optimiser steps
CHECKPOINT_FORMAT = "checkpoint_{step:09d}.pt"
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
_TEMP_PREFIX = ".tmp-checkpoint-"
#: bump when the layout of the saved dictionary changes incompatibly
FORMAT_VERSION = 1


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """``directory/checkpoint_<step, 9 digits>.pt``."""
    return Path(directory) / CHECKPOINT_FORMAT.format(step=step)


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


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
    """Write ``path`` atomically: ``write(binary_file)`` fills a temporary file in the same
    folder, which is fsync-ed and renamed over ``path``. On any exception the temporary file
    is removed, ``path`` is untouched and the exception propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
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


def save_checkpoint(
    state: dict[str, Any], directory: str | os.PathLike[str], step: int, keep: int = 3
) -> Path:
    """Atomically save ``state`` as ``checkpoint_<step>.pt`` and keep the newest ``keep``.

    Returns the path written. Stale temporary files of earlier, killed saves are removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(_TEMP_PREFIX + "*"):
        stale.unlink(missing_ok=True)
    payload = {"format_version": FORMAT_VERSION, **state}
    path = atomic_write(checkpoint_path(directory, step), lambda f: torch.save(payload, f))
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        ValueError: the file is not a facemetric checkpoint, or of another format version.
    """
    state = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "format_version" not in state:
        raise ValueError(f"{path} is not a facemetric training checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {state['format_version']}, this version of "
            f"facemetric reads format {FORMAT_VERSION}"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), NumPy and ``random``,
    as tensors and plain numbers."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["algorithm"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "atomic_write",
    "capture_rng_state",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]
