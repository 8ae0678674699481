"""Atomic, resumable checkpoints: ``checkpoint_<step>.pt`` files in the run's folder.

A checkpoint is written to a temporary file in the same folder, flushed and ``fsync``-ed,
then renamed over its final name with ``os.replace`` (atomic on POSIX and Windows) and the
folder entry is synced: a crash at any moment leaves either the complete new file or none,
never a partial ``checkpoint_*.pt``. A failed save removes its temporary file; temporary
files left by a killed process are ignored by :func:`latest_checkpoint` and removed by the
next save. Only the newest ``keep`` checkpoints are kept.

A file can still be damaged after the fact (a full disk, a copy cut short):
:func:`load_checkpoint` reports any unreadable file as a :class:`CheckpointError` (a
``ValueError`` with a sentence, never a raw unpickling traceback), and
:func:`load_newest_checkpoint` — what ``--resume`` uses — skips a damaged newest checkpoint,
or one with NaN/Inf weights, with a warning and falls back to the previous one.

Contents are plain containers of tensors, numbers and strings (NumPy and Python RNG states
are converted), so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facemetric.atomic import TEMP_PREFIX, atomic_write

logger = logging.getLogger(__name__)

#: file name of the checkpoint after ``step`` optimiser steps
CHECKPOINT_FORMAT = "checkpoint_{step:09d}.pt"
_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
_TEMP_PREFIX = TEMP_PREFIX + "checkpoint_"  # what atomic_write names its temporary files
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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable (truncated, not a torch file), not
    a facemetric checkpoint, of another format version, or holding non-finite weights."""


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ``ValueError``) the file cannot be read — truncated or damaged —
            or is not a facemetric checkpoint, or is of another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch/zip/pickle signal damage with many exception types
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); the file is damaged or "
            "truncated (e.g. a disk that filled up): delete it to resume from an older one"
        ) from err
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a facemetric training checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, this version of "
            f"facemetric reads format {FORMAT_VERSION}"
        )
    return state


def _finite(t: torch.Tensor, block: int = 1 << 22) -> bool:
    """Whether every entry of ``t`` is finite (checked in blocks: no full-size mask)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(block))


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names (dotted paths) of the floating-point tensors in the nested ``state`` that hold a
    NaN or an infinity."""
    bad: list[str] = []

    def visit(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not _finite(value):
                bad.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                visit(item, f"{name}.{i}")

    visit(state, "")
    return bad


def load_newest_checkpoint(
    directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest usable checkpoint of ``directory`` and its contents, or ``None`` if the
    folder holds no checkpoint.

    A checkpoint is usable when :func:`load_checkpoint` reads it and its model and loss
    weights are finite. An unusable one (truncated by a crash of the disk rather than of the
    process, damaged, or with NaN weights) is skipped with a warning naming it and why, and
    the next older one is tried; the files are left in place.

    Raises:
        CheckpointError: there are checkpoints, but none is usable (each one's reason listed).
    """
    found = list_checkpoints(directory)
    reasons: list[str] = []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path, map_location=map_location)
            bad = non_finite_tensors({"model": state.get("model", {}),
                                      "loss": state.get("loss", {})})
            if bad:
                raise CheckpointError(
                    f"{path} holds non-finite weights ({', '.join(bad[:5])}"
                    f"{' ...' if len(bad) > 5 else ''})"
                )
        except (CheckpointError, FileNotFoundError) as err:
            reasons.append(str(err))
            logger.warning("cannot use %s: %s; falling back to the previous checkpoint",
                           path.name, err)
            continue
        if reasons:
            logger.warning("resuming from %s: %d newer checkpoint(s) could not be used",
                           path, len(reasons))
        return path, state
    if reasons:
        raise CheckpointError(
            f"no usable checkpoint in {directory}: " + "; ".join(reasons)
            + ". Move the damaged files away to start again, or resume from a copy"
        )
    return None


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
    "CheckpointError",
    "atomic_write",
    "capture_rng_state",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_newest_checkpoint",
    "non_finite_tensors",
    "restore_rng_state",
    "save_checkpoint",
]
