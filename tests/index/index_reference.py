"""Independent float64 numpy references for the index tests (loops and plain algebra)."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n_centres: int, per_centre: int, dim: int, spread: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_centres × per_centre`` float32 vectors around random centres, and their centre.

    Centres and noise are ``N(0, 1/dim)`` per entry (norm about 1), the noise scaled by
    ``spread``: a vector's cosine to its centre is about ``1 / √(1 + spread²)``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim)) / np.sqrt(dim)
    owner = np.repeat(np.arange(n_centres), per_centre)
    x = centres[owner] + spread * rng.normal(size=(owner.size, dim)) / np.sqrt(dim)
    return x.astype(np.float32), owner


def brute_templates(queries: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Cosines of every query to every template ``(Q, n)`` (float64)."""
    return unit(queries) @ unit(templates).T


def brute_persons(queries: np.ndarray, templates: np.ndarray, owners: np.ndarray,
                  mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Person scores ``(Q, P)`` by a loop over persons, and the person ids ``(P,)``."""
    q, t = unit(queries), unit(templates)
    persons = np.unique(owners)
    out = np.empty((len(q), len(persons)))
    for j, p in enumerate(persons):
        mine = t[owners == p]
        if mode == "max":
            out[:, j] = (q @ mine.T).max(axis=1)
        else:
            mean = mine.sum(axis=0)
            out[:, j] = q @ (mean / np.linalg.norm(mean))
    return out, persons


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the ``k`` largest values, best first, and their columns."""
    if k < scores.shape[1]:  # the k largest in any order, then sorted
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    cols = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, cols, axis=1), cols


def brute_knn(vectors: np.ndarray, k: int, rows: np.ndarray | None = None,
              chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` other rows of highest cosine for each of ``rows`` (float64, in chunks)."""
    x = unit(vectors)
    rows = np.arange(len(x)) if rows is None else np.asarray(rows)
    ids = np.empty((len(rows), k), dtype=np.int64)
    sims = np.empty((len(rows), k))
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        s = x[r] @ x.T
        s[np.arange(len(r)), r] = -np.inf
        sims[start : start + chunk], ids[start : start + chunk] = top_k(s, k)
    return sims, ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of ``|found ∩ truth| / |truth|`` (``-1`` entries ignored)."""
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, int((t >= 0).sum()))
            for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))
