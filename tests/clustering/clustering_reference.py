"""Brute-force float64 references for the clustering tests: the full similarity matrix,
every cluster pair scored on every step by plain loops."""

from __future__ import annotations

import numpy as np


def linkage_value(sim: np.ndarray, a: list[int], b: list[int], linkage: str) -> float:
    cross = [sim[i, j] for i in a for j in b]
    if linkage == "single":
        return max(cross)
    if linkage == "complete":
        return min(cross)
    return sum(cross) / len(cross)


def greedy_reference(x: np.ndarray, threshold: float, linkage: str,
                     photos: list[int] | None = None,
                     groups: list[int] | None = None) -> list[frozenset[int]]:
    """Merge the best allowed pair while its linkage >= threshold; returns the partition."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    sim = x @ x.T
    photos = photos if photos is not None else [-1] * n
    groups = groups if groups is not None else [-1] * n
    clusters: list[list[int]] = []
    frozen: list[bool] = []
    seen: dict[int, int] = {}
    for i in range(n):
        if groups[i] >= 0 and groups[i] in seen:
            clusters[seen[groups[i]]].append(i)
            continue
        if groups[i] >= 0:
            seen[groups[i]] = len(clusters)
        clusters.append([i])
        frozen.append(groups[i] >= 0)
    while True:
        best, pick = -np.inf, None
        for p in range(len(clusters)):
            for q in range(p + 1, len(clusters)):
                if frozen[p] and frozen[q]:
                    continue
                pa = {photos[i] for i in clusters[p] if photos[i] >= 0}
                pb = {photos[i] for i in clusters[q] if photos[i] >= 0}
                if pa & pb:
                    continue
                value = linkage_value(sim, clusters[p], clusters[q], linkage)
                if value > best:
                    best, pick = value, (p, q)
        if pick is None or best < threshold:
            return [frozenset(c) for c in clusters]
        p, q = pick
        clusters[p] = clusters[p] + clusters[q]
        frozen[p] = frozen[p] or frozen[q]
        del clusters[q], frozen[q]


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    out: dict[int, set[int]] = {}
    for i, lab in enumerate(np.asarray(labels).tolist()):
        out.setdefault(lab, set()).add(i)
    return {frozenset(v) for v in out.values()}
