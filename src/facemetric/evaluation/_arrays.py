"""Input coercion and checks shared by the evaluation modules.

Evaluation takes arrays, whatever produced them: numpy arrays, sequences or torch tensors
(detached and moved to the CPU here). Every check raises ``ValueError`` naming the argument
and what was wrong, so a bad input never turns into a silently wrong metric.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

# Rows with a norm below this are left unscaled by ``normalize_rows`` (their cosine to
# everything is then 0 rather than NaN), as ``torch.nn.functional.normalize`` does.
NORM_EPS = 1e-12


def to_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array (a torch tensor is detached and copied to the CPU)."""
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """A 1-D, finite, real ``float64`` copy of ``scores``."""
    arr = to_numpy(scores)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.number)):
        raise ValueError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} contain {bad} NaN or Inf values of {arr.size}")
    return arr


def check_bool_labels(is_same: Any, length: int, name: str = "is_same") -> np.ndarray:
    """A 1-D boolean array of ``length`` (``True``/``False`` or 0/1 integers)."""
    arr = to_numpy(is_same)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {arr.shape}")
    if arr.dtype == bool:
        return arr.copy()
    if np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise ValueError(f"{name} must be booleans (or 0/1 integers), got dtype {arr.dtype}")


def encode_labels(labels: Any, name: str = "labels", length: int | None = None) -> np.ndarray:
    """Labels of any comparable dtype as dense ``int64`` ids ``0..C-1`` (sorted order)."""
    arr = to_numpy(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {length}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or Inf")
    _, inverse = np.unique(arr, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def check_embeddings(x: Any, name: str = "embeddings") -> Tensor:
    """A 2-D, finite, floating CPU tensor (``float32`` unless given ``float64``)."""
    if isinstance(x, Tensor):
        t = x.detach().cpu()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (num, dim), got {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} are empty (shape {tuple(t.shape)})")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(f"{name} contain NaN or Inf in {bad} of {t.shape[0]} rows")
    return t


def normalize_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm; rows of norm below ``NORM_EPS`` are left as they are."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def rows_per_block(num_columns: int, max_block_bytes: int, bytes_per_entry: int = 4) -> int:
    """How many rows of a ``(rows, num_columns)`` block fit in ``max_block_bytes`` (≥ 1)."""
    if max_block_bytes <= 0:
        raise ValueError(f"max_block_bytes must be positive, got {max_block_bytes}")
    return max(1, max_block_bytes // max(1, num_columns * bytes_per_entry))
